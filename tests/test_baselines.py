"""The baselines beside the structures: quantization (RTN and GPTQ) and pruning (magnitude and
Wanda), checked against hand computations and against the objective every fit minimises."""

import copy

import pytest
import torch
from torch import nn

from bcllm import compress_
from bcllm.ops.stats import InputStats
from bcllm.structures.base import fit_objective
from bcllm.structures.quantized import PruneConfig, PrunedLinear, QuantConfig, QuantizedLinear
from conftest import tiny_model


def linear(out_f=12, in_f=64, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(in_f, out_f)
    return layer


def stats_of(x: torch.Tensor) -> InputStats:
    xx = (x.T @ x).double()
    return InputStats(xx=xx, xt=xx, n=x.shape[0])


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (3, 16), (2, 32)])
def test_round_to_nearest_is_within_half_a_step_and_dequantises_by_hand(bits, group):
    lin = linear()
    q = QuantizedLinear.from_linear(lin, bits, group)
    g = group or 64
    w = lin.weight.detach().reshape(12, -1, g)
    lo, hi = w.amin(-1), w.amax(-1)
    step = (hi - lo) / (2 ** bits - 1)
    assert int(q.codes.max()) <= 2 ** bits - 1
    by_hand = ((q.codes.float().reshape(12, -1, g) - q.zero[..., None]) * q.scale[..., None]).reshape(12, 64)
    assert torch.allclose(q.to_dense(), by_hand)
    err = (q.to_dense() - lin.weight).abs().reshape(12, -1, g)
    assert (err <= step[..., None] / 2 + 1e-6).all()
    x = torch.randn(5, 64)
    assert torch.allclose(q(x), x @ by_hand.T + lin.bias, atol=1e-5)
    assert torch.allclose(q.to_dense().reshape(12, -1, g).amin(-1), lo, atol=1e-6)  # min is code 0, exactly
    assert q.costs()["bytes"] == 12 * 64 * bits / 8 + 4 * (2 * 12 * (64 // g) + 12)


def test_gptq_lowers_the_output_error_below_rounding_and_equals_it_without_correlation():
    lin = linear(16, 64, seed=1)
    g = torch.Generator().manual_seed(2)
    mix = torch.randn(64, 64, generator=g) * 0.3 + torch.eye(64)
    x = torch.randn(2000, 64, generator=g) @ mix  # correlated inputs: error compensation has room
    stats = stats_of(x)
    rtn = QuantizedLinear.from_linear(lin, 3, 16)
    gptq = copy.deepcopy(rtn).fit_(lin.weight, stats, ridge=1e-6)
    w = lin.weight.detach()
    out_err = lambda m: ((x @ (m.to_dense() - w).T) ** 2).sum().item()  # noqa: E731
    assert out_err(gptq) < 0.8 * out_err(rtn)
    assert fit_objective(gptq.to_dense(), w, stats) < fit_objective(rtn.to_dense(), w, stats)
    # independent inputs of equal scale: nothing to compensate, GPTQ is rounding to nearest
    white = InputStats(xx=torch.eye(64, dtype=torch.float64), xt=torch.eye(64, dtype=torch.float64), n=1)
    same = copy.deepcopy(rtn).fit_(lin.weight, white, ridge=0.0)
    assert torch.equal(same.codes, rtn.codes) and torch.allclose(same.scale, rtn.scale)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_zero_inside_grid_holds_zero_exactly_and_its_integer_zero_point(bits):
    torch.manual_seed(3)
    lin = linear()
    with torch.no_grad():
        lin.weight[:, :32] = lin.weight[:, :32].abs() + 0.05  # a group entirely above zero: min..max misses 0
        lin.weight[:, 40:44] = 0.0  # exact zeros inside a mixed-sign group
    q = QuantizedLinear.from_linear(lin, bits, 32, zero_point="int")
    w = lin.weight.detach().reshape(12, -1, 32)
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    step = (hi - lo) / (2 ** bits - 1)
    assert torch.allclose(q.scale, step)  # by hand: the range widened to hold 0
    assert torch.equal(q.zero, torch.round(-lo / step))
    assert torch.equal(q.to_dense()[:, 40:44], torch.zeros(12, 4))  # a zero weight is exactly zero
    float_grid = QuantizedLinear.from_linear(lin, bits, 32)
    assert float_grid.to_dense()[:, 40:44].abs().max() > 0  # the min..max grid has no exact zero
    err = (q.to_dense() - lin.weight).abs().reshape(12, -1, 32)
    assert (err <= step[..., None] * 1.0 + 1e-6).all()  # rounding the zero point moves the grid by < half a step
    assert q.sizes()["zero_point"] == "int"
    with pytest.raises(Exception, match="zero_point must be one of float, int"):
        QuantizedLinear.from_linear(lin, bits, 32, zero_point="half")


def test_gptq_damping_is_the_larger_of_ridge_and_damp():
    lin = linear(16, 64, seed=1)
    x = torch.randn(500, 64, generator=torch.Generator().manual_seed(4)) @ (torch.eye(64) + 0.3)
    stats = stats_of(x)
    damped = QuantizedLinear.from_linear(lin, 3, 16, damp=1e-2).fit_(lin.weight, stats, ridge=1e-4)
    ridged = QuantizedLinear.from_linear(lin, 3, 16).fit_(lin.weight, stats, ridge=1e-2)
    plain = QuantizedLinear.from_linear(lin, 3, 16).fit_(lin.weight, stats, ridge=1e-4)
    assert torch.equal(damped.codes, ridged.codes) and torch.allclose(damped.scale, ridged.scale)
    assert not torch.equal(damped.codes, plain.codes)


def test_wanda_keeps_the_largest_weight_times_input_norm_per_row():
    lin = linear(6, 8, seed=3)
    x = torch.randn(100, 8) * torch.tensor([0.1, 1, 5, 0.2, 3, 0.5, 2, 1])
    stats = stats_of(x)
    pruned = PrunedLinear.from_linear(lin, 0.5, "unstructured").fit_(lin.weight, stats)
    w = lin.weight.detach()
    score = w.abs() * x.norm(dim=0)  # by hand: |W_ij| * ||X_j||
    for i in range(6):
        keep = set(score[i].argsort(descending=True)[:4].tolist())
        assert set(pruned.mask[i].nonzero().flatten().tolist()) == keep
    assert torch.equal(pruned.to_dense(), w * pruned.mask)
    assert pruned.num_params == 6 * 4 + 6


def test_two_four_keeps_two_of_every_four_and_magnitude_without_statistics():
    lin = linear(5, 16, seed=4)
    p = PrunedLinear.from_linear(lin, pattern="2:4")
    assert (p.mask.reshape(5, 4, 4).sum(-1) == 2).all()
    w = lin.weight.detach().abs().reshape(5, 4, 4)
    kept = w * p.mask.reshape(5, 4, 4)
    dropped_max = (w * ~p.mask.reshape(5, 4, 4)).amax(-1)
    kept_min = torch.where(p.mask.reshape(5, 4, 4), kept, torch.inf).amin(-1)
    assert (kept_min >= dropped_max).all()


def test_quantized_and_pruned_students_count_bytes_and_parameters_honestly(tmp_path):
    from bcllm.io.checkpoint import load_fitted, save_fitted

    model = tiny_model("llama", layers=2)
    q = copy.deepcopy(model)
    summary = compress_(q, QuantConfig(bits=4, group_size=32, targets="mlp"))
    weights = 2 * 3 * 64 * 96
    assert summary["model_params_after"] >= summary["model_params_before"]  # quantization keeps every weight
    assert summary["structured_bytes"] == pytest.approx(weights * 4 / 8 + 4 * 2 * weights / 32)
    assert summary["replaced_bytes"] == weights * 4
    with torch.no_grad():  # a trained scale, saved and loaded with the codes
        next(m for m in q.modules() if isinstance(m, QuantizedLinear)).scale.mul_(1.1)
    save_fitted(q, tmp_path / "q", QuantConfig(bits=4, group_size=32, targets="mlp"))
    again = copy.deepcopy(model)
    load_fitted(again, tmp_path / "q")
    ids = torch.randint(0, 128, (1, 9))
    assert torch.allclose(again(ids).logits, q(ids).logits, atol=1e-6)
    p = copy.deepcopy(model)
    summary = compress_(p, PruneConfig(pattern="2:4", targets="mlp"))
    assert summary["structured_params"] == weights // 2  # (no biases in Llama's MLP)


def test_quant_grid_and_damping_reach_the_modules_from_the_spec(tmp_path):
    from bcllm.errors import InputError
    from bcllm.fit.student import StudentSpec, config_for
    from bcllm.io.checkpoint import load_fitted, save_fitted

    config = config_for(StudentSpec(structure="quant", block_size=2, quant_grid="int", quant_damp=0.01, layers="0"))
    model = tiny_model("llama", layers=2)
    compress_(model, config)
    modules = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert modules and all((m.bits, m.zero_point, m.damp) == (2, "int", 0.01) for m in modules)
    assert all(torch.equal(m.zero, m.zero.round()) for m in modules)  # integer zero points: GPTQ's grid
    save_fitted(model, tmp_path / "q", config)
    again = tiny_model("llama", layers=2)
    load_fitted(again, tmp_path / "q")
    assert all(m.zero_point == "int" for m in again.modules() if isinstance(m, QuantizedLinear))
    with pytest.raises(InputError, match="quant_grid applies to structure quant"):
        StudentSpec(structure="circulant", quant_grid="int")


def test_int8_per_row_decode_runs_the_int8_kernel_against_the_dequantised_weight():
    """8 bits, one grid per row, up to 4 rows without gradients: PyTorch's int8 kernel with bfloat16
    activations (its output rounded to bfloat16: within 1% of the largest output) against x W_hat^T
    computed in float64 from the dequantised weight; the float path beyond 4 rows, under
    gradients, or with groups, exactly as before."""
    from bcllm.structures import quantized

    if not quantized.int8_kernel_available():
        pytest.skip("this torch build has no int8 weight-only kernel")
    lin = linear(out_f=40, in_f=96, seed=1)
    q = QuantizedLinear.from_linear(lin, 8)
    for rows in (1, 3, 4):
        x = torch.randn(rows, 96)
        ref = x.double() @ q.to_dense().double().T + lin.bias.double()
        with torch.no_grad():
            y = q(x)
        assert y.dtype == torch.float32 and q._packed is not None
        assert (y.double() - ref).abs().max() <= 0.01 * ref.abs().max()
        assert not torch.allclose(y.double(), ref, atol=1e-6)  # (the kernel ran: bfloat16 rounding shows)
    x = torch.randn(2, 1, 96)  # a decode step's (batch, 1, in) keeps its shape
    with torch.no_grad():
        assert q(x).shape == (2, 1, 40)
    exact = torch.randn(5, 96)
    with torch.no_grad():
        assert torch.allclose(q(exact), exact @ q.to_dense().T + lin.bias, atol=1e-5)
    one = torch.randn(1, 96)
    y = q(one)  # gradients to the scales: the float path, which trains them
    assert torch.allclose(y, one @ q.to_dense().T + lin.bias, atol=1e-5)
    y.sum().backward()
    assert q.scale.grad is not None
    with torch.no_grad():  # the pack follows a change of the grid (its version counter)
        before = q(one)
        q.scale.mul_(2)
        ref = one.double() @ q.to_dense().double().T + lin.bias.double()
        assert (q(one).double() - ref).abs().max() <= 0.01 * ref.abs().max()
        assert not torch.allclose(q(one), before, atol=1e-3)
    grouped = QuantizedLinear.from_linear(lin, 8, 32)
    with torch.no_grad():
        assert torch.allclose(grouped(one), one @ grouped.to_dense().T + lin.bias, atol=1e-5)


@pytest.mark.parametrize("in_f", [12, 100])
def test_int8_decode_keeps_the_float_path_for_inputs_the_kernel_cannot_take(in_f):
    """PyTorch's int8 kernel reads inputs in 8s/16s without a tail (NaN or a crash otherwise): layers
    whose inputs do not come in 32s multiply exactly as before."""
    lin = linear(out_f=6, in_f=in_f, seed=2)
    q = QuantizedLinear.from_linear(lin, 8)
    one = torch.randn(1, in_f)
    with torch.no_grad():
        y = q(one)
    assert torch.isfinite(y).all() and torch.allclose(y, one @ q.to_dense().T + lin.bias, atol=1e-5)
    assert getattr(q, "_packed", None) is None


def test_int8_decode_leaves_gradients_to_the_input_and_zero_scales_to_the_float_rules():
    """A frozen int8 layer inside a trained model: gradients flow to its input (the kernel has no
    derivative, so that case takes the float path). A row whose scale is 0 gives its bias, not NaN.
    A copy of the layer carries no pack (rebuilt on use)."""
    from bcllm.structures import quantized

    if not quantized.int8_kernel_available():
        pytest.skip("this torch build has no int8 weight-only kernel")
    lin = linear(out_f=8, in_f=64, seed=3)
    with torch.no_grad():
        lin.weight[2] = 0
    q = QuantizedLinear.from_linear(lin, 8)
    with torch.no_grad():
        q.scale[2] = 0  # (as a float16 model's 1e-12 underflows)
    q.requires_grad_(False)
    x = torch.randn(1, 64, requires_grad=True)
    q(x).sum().backward()
    assert torch.allclose(x.grad, q.to_dense().sum(0)[None], atol=1e-5)
    with torch.no_grad():
        y = q(torch.randn(1, 64))
    assert q._packed is not None and torch.isfinite(y).all()
    assert y[0, 2] == pytest.approx(lin.bias[2].item(), abs=1e-6)
    assert getattr(copy.deepcopy(q), "_packed", None) is None


def test_int8_decode_compiles_without_a_graph_break():
    """bench model compiles the decode step: the int8 path (packed before compiling, as the eager
    pass does) must stay one graph, or the whole loop falls back to eager."""
    from bcllm.structures import quantized

    if not quantized.int8_kernel_available():
        pytest.skip("this torch build has no int8 weight-only kernel")
    lin = linear(out_f=16, in_f=64, seed=4)
    q = QuantizedLinear.from_linear(lin, 8).requires_grad_(False)
    one = torch.randn(1, 64)
    with torch.no_grad():
        eager = q(one)  # packs
        explained = torch._dynamo.explain(q)(one)
        compiled = torch.compile(q, backend="eager", fullgraph=True)(one)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert torch.allclose(compiled, eager)
