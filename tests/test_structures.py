"""Equal-budget structures: each fit against an independent solution, budgets, and compress_."""

import copy

import pytest
import torch
from torch import nn

from bcllm import compress_
from bcllm.fit.closed_form import InputStats
from bcllm.structures import BlockCirculantLinear
from bcllm.structures import (BlockDiagonalConfig, BlockDiagonalLinear, CirculantPlusLowRankLinear,
                              HybridConfig, LowRankConfig, LowRankLinear, budget_report)
from bcllm.structures.base import circulant_params, fit_objective
from bcllm.structures import CirculantConfig
from conftest import tiny_model

F64 = torch.float64


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def dense_linear(out_features, in_features, seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias, dtype=F64)


def calibration(in_features, n=400, seed=1, sequential=False):
    """Anisotropic, correlated inputs (like real activations); x_t = x_s + noise when sequential."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_features, in_features, generator=g, dtype=F64) * torch.logspace(0, -2, in_features, dtype=F64)
    x_s = torch.randn(n, in_features, generator=g, dtype=F64) @ mix.T
    x_t = x_s + 0.3 * torch.randn(n, in_features, generator=g, dtype=F64) @ mix.T if sequential else x_s
    return x_s, x_t, InputStats(xx=x_s.T @ x_s, xt=x_s.T @ x_t, n=n)


def data_error(w_hat, weight, x_s, x_t):
    """sum_n ||W_hat x_s - W x_t||^2, straight from the samples."""
    return float(((x_s @ w_hat.T.to(F64) - x_t @ weight.T.to(F64)) ** 2).sum())


def modules_under_test(in_features=24, out_features=16):
    return [LowRankLinear(in_features, out_features, 3, dtype=F64),
            BlockDiagonalLinear(in_features, out_features, 5, dtype=F64),
            CirculantPlusLowRankLinear(in_features, out_features, 4, 2, dtype=F64)]


@pytest.mark.parametrize("module", modules_under_test(), ids=lambda m: type(m).__name__)
def test_forward_equals_dense(module):
    x = torch.randn(2, 3, 24, dtype=F64)
    ref = x @ module.to_dense().T + module.bias
    assert torch.allclose(module(x), ref, atol=1e-5)  # the circulant part computes in float32
    assert module.num_params == sum(p.numel() for p in module.parameters())
    costs = module.costs()
    assert costs["flops"] > 0 and costs["params"] == module.num_params


def test_lowrank_plain_is_eckart_young():
    linear = dense_linear(30, 40)
    w = linear.weight.detach()
    s = torch.linalg.svdvals(w)
    layer = LowRankLinear.from_linear(linear, 5)
    assert torch.linalg.norm(w - layer.to_dense()) == pytest.approx(float(s[5:].square().sum().sqrt()), rel=1e-9)
    assert torch.equal(layer.bias, linear.bias)
    assert layer.num_params == 5 * (30 + 40) + 30
    assert layer.costs() == {"flops": 2 * 5 * 70 + 30, "bytes": 8 * layer.num_params, "params": layer.num_params}


@pytest.mark.parametrize("sequential", [False, True])
def test_lowrank_aware_is_reduced_rank_regression(sequential):
    """Independent reference: reduced-rank regression from the samples (fitted values of the
    unconstrained least squares projected on their top-r left singular vectors)."""
    linear = dense_linear(10, 14)
    w = linear.weight.detach()
    x_s, x_t, stats = calibration(14, sequential=sequential)
    y = x_t @ w.T                                                       # (N, out) targets
    b_ols = torch.linalg.lstsq(x_s, y).solution                         # (in, out)
    u = torch.linalg.svd(x_s @ b_ols, full_matrices=False).Vh[:4]        # top-4 output directions
    reference = (b_ols @ u.T @ u).T
    layer = LowRankLinear(14, 10, 4, dtype=F64).fit_(w, stats, ridge=0.0)
    assert torch.allclose(layer.to_dense(), reference, atol=1e-8, rtol=1e-6)
    # and the objective it reports is the data error up to a constant
    const = float((y ** 2).sum())
    assert fit_objective(layer.to_dense(), w, stats) + const == pytest.approx(
        data_error(layer.to_dense(), w, x_s, x_t), rel=1e-9)


def test_lowrank_aware_beats_plain_on_data():
    linear = dense_linear(12, 20)
    x_s, x_t, stats = calibration(20)
    plain = LowRankLinear.from_linear(linear, 3)
    aware = LowRankLinear.from_linear(linear, 3).fit_(linear.weight, stats, ridge=0.0)
    w = linear.weight.detach()
    assert data_error(aware.to_dense(), w, x_s, x_t) < 0.9 * data_error(plain.to_dense(), w, x_s, x_t)
    # and moving the factors away from the optimum (staying rank 3) only makes it worse
    for seed in range(5):
        torch.manual_seed(seed)
        worse = (aware.up + 1e-3 * torch.randn_like(aware.up)) @ (aware.down + 1e-3 * torch.randn_like(aware.down))
        assert data_error(worse, w, x_s, x_t) > data_error(aware.to_dense(), w, x_s, x_t)


@pytest.mark.parametrize("out_features,in_features,k", [(16, 24, 4), (10, 7, 3), (9, 9, 9)])
def test_blockdiag_plain_keeps_diagonal_blocks(out_features, in_features, k):
    linear = dense_linear(out_features, in_features)
    layer = BlockDiagonalLinear.from_linear(linear, k)
    bo, bi = -(-out_features // k), -(-in_features // k)
    mask = torch.zeros(out_features, in_features, dtype=torch.bool)
    for i in range(k):
        mask[i * bo:(i + 1) * bo, i * bi:(i + 1) * bi] = True
    assert torch.equal(layer.to_dense(), torch.where(mask, linear.weight, 0))
    x = torch.randn(5, in_features, dtype=F64)
    assert torch.allclose(layer(x), linear(x) - x @ torch.where(mask, 0, linear.weight).T, atol=1e-10)


@pytest.mark.parametrize("out_features,in_features,k", [(16, 24, 4), (10, 7, 3)])
@pytest.mark.parametrize("sequential", [False, True])
def test_blockdiag_aware_is_per_block_lstsq(out_features, in_features, k, sequential):
    linear = dense_linear(out_features, in_features)
    w = linear.weight.detach()
    x_s, x_t, stats = calibration(in_features, sequential=sequential)
    layer = BlockDiagonalLinear(in_features, out_features, k, dtype=F64).fit_(w, stats, ridge=0.0)
    bo, bi = -(-out_features // k), -(-in_features // k)
    y = x_t @ w.T
    reference = torch.zeros(out_features, in_features, dtype=F64)
    for i in range(k):
        rows, cols = slice(i * bo, (i + 1) * bo), slice(i * bi, (i + 1) * bi)
        if x_s[:, cols].shape[1] and y[:, rows].shape[1]:
            reference[rows, cols] = torch.linalg.lstsq(x_s[:, cols], y[:, rows]).solution.T
    assert torch.allclose(layer.to_dense(), reference, atol=1e-8, rtol=1e-6)


def test_singular_gram_without_ridge_is_a_clear_error():
    linear = dense_linear(8, 12)
    x = torch.randn(5, 12, dtype=F64)  # 5 tokens, 12 inputs: rank-deficient
    stats = InputStats(xx=x.T @ x, xt=x.T @ x, n=5)
    for layer in (LowRankLinear(12, 8, 2, dtype=F64), BlockDiagonalLinear(12, 8, 2, dtype=F64)):
        with pytest.raises(ValueError, match="singular.*ridge > 0"):
            layer.fit_(linear.weight, stats, ridge=0.0)
        layer.fit_(linear.weight, stats, ridge=1e-3)  # fine with a ridge
        assert torch.isfinite(layer.to_dense()).all()


@pytest.mark.parametrize("sequential", [False, True])
def test_hybrid_aware_monotone_and_beats_each_part(sequential):
    linear = dense_linear(16, 24)
    w = linear.weight.detach()
    x_s, x_t, stats = calibration(24, sequential=sequential)
    ridge = 1e-6
    hybrid = CirculantPlusLowRankLinear(24, 16, 4, 2, dtype=F64).fit_(w, stats, ridge=ridge, rounds=5)
    history = hybrid.fit_history
    assert len(history) == 11
    assert all(b <= a + 1e-9 * abs(a) for a, b in zip(history, history[1:]))
    assert history[-1] == pytest.approx(fit_objective(hybrid.to_dense(), w, stats, ridge), rel=1e-9)
    circ = BlockCirculantLinear(24, 16, 4, dtype=F64).fit_(w, stats, ridge)
    low = LowRankLinear(24, 16, 2, dtype=F64).fit_(w, stats, ridge)
    hybrid_error = data_error(hybrid.to_dense(), w, x_s, x_t)
    assert hybrid_error < data_error(circ.to_dense(), w, x_s, x_t)
    assert hybrid_error < data_error(low.to_dense(), w, x_s, x_t)


def test_hybrid_frobenius_beats_each_part():
    linear = dense_linear(16, 24)
    w = linear.weight.detach()
    hybrid = CirculantPlusLowRankLinear.from_linear(linear, 4, 2)
    assert all(b <= a + 1e-9 for a, b in zip(hybrid.fit_history, hybrid.fit_history[1:]))
    err = torch.linalg.norm(w - hybrid.to_dense())
    assert err < torch.linalg.norm(w - BlockCirculantLinear.from_linear(linear, 4).to_dense())
    assert err < torch.linalg.norm(w - LowRankLinear.from_linear(linear, 2).to_dense())
    assert torch.equal(hybrid.bias, linear.bias)


def test_hybrid_costs_are_the_sum_of_its_parts():
    from bcllm.ops.costs import circulant_costs

    hybrid = CirculantPlusLowRankLinear(576, 1536, 32, 13, bias=False)
    c = circulant_costs(1536, 576, 32)
    assert hybrid.costs() == {"flops": c["flops"] + 2 * 13 * (1536 + 576), "bytes": c["bytes"] + 4 * 13 * 2112,
                              "params": 1536 * 576 // 32 + 13 * 2112}


def test_budget_sizes_on_smollm2_shapes():
    assert circulant_params(1536, 576, 16) == 1536 * 576 // 16
    assert LowRankConfig(budget_block_size=16).size_for("gate_proj", 1536, 576) == {"rank": 26}   # 55296 // 2112
    assert BlockDiagonalConfig(budget_block_size=16).size_for("gate_proj", 1536, 576) == {"num_blocks": 16}
    hybrid = HybridConfig(budget_block_size=16)
    assert hybrid.size_for("gate_proj", 1536, 576) == {"block_size": 32, "rank": 13}
    # non-divisible: 100x70 at b=16 -> circulant 7*5*16 = 560 weights
    assert LowRankConfig(budget_block_size=16).size_for("x", 100, 70)["rank"] == 560 // 170
    k = BlockDiagonalConfig(budget_block_size=16).size_for("x", 100, 70)["num_blocks"]
    assert k * -(-100 // k) * -(-70 // k) <= 560 < (k - 1) * -(-100 // (k - 1)) * -(-70 // (k - 1))


STRUCTURE_CONFIGS = [
    (LowRankConfig(budget_block_size=8, targets=["gate_proj", "down_proj"], layers="1-2"), LowRankLinear),
    (BlockDiagonalConfig(budget_block_size=8, targets=["gate_proj", "down_proj"], layers="1-2"), BlockDiagonalLinear),
    (HybridConfig(budget_block_size=8, targets=["gate_proj", "down_proj"], layers="1-2"), CirculantPlusLowRankLinear),
]


@pytest.mark.parametrize("cfg,cls", STRUCTURE_CONFIGS, ids=lambda c: type(c).__name__)
def test_compress_replaces_exactly_selected_within_budget(cfg, cls):
    model = tiny_model("llama", layers=4)
    summary = compress_(model, cfg)
    names = sorted(n for n, m in model.named_modules() if isinstance(m, cls))
    assert names == sorted(f"model.layers.{i}.mlp.{t}" for i in (1, 2) for t in ("gate_proj", "down_proj"))
    assert summary["modules"] == names or sorted(summary["modules"]) == names
    assert summary["config"]["structure"] == cfg.describe()["structure"]
    report = budget_report(model, summary["modules"], 8)
    assert report["actual_params"] == summary["structured_params"] <= report["budget_params"]
    assert report["budget_params"] == 4 * 96 * 64 // 8  # four 96x64 layers, no bias
    assert torch.isfinite(model(torch.randint(0, 128, (1, 6))).logits).all()


@pytest.mark.parametrize("cfg", [
    LowRankConfig(budget_block_size=8), BlockDiagonalConfig(budget_block_size=8), HybridConfig(budget_block_size=8)],
    ids=lambda c: type(c).__name__)
def test_compress_with_aware_fit_of_each_structure(cfg):
    """The calibration driver fits any module with fit_: every structure gets closer to the teacher."""
    from bcllm.fit.closed_form import fit_aware_

    teacher = tiny_model("llama", layers=2)
    torch.manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 128, (8, 64)), "attention_mask": torch.ones(8, 64, dtype=torch.long)}]
    ids = batches[0]["input_ids"]  # the fit minimises each layer's error on these tokens
    ref = teacher(ids).logits
    student = copy.deepcopy(teacher)
    summary = compress_(student, cfg)
    plain = (student(ids).logits - ref).norm()
    fit_aware_(student, teacher, batches, progress=False)
    assert all(type(student.get_submodule(n)) is type(cfg.build(n, teacher.get_submodule(n)))
               for n in summary["modules"])
    assert (student(ids).logits - ref).norm() < plain


@pytest.mark.parametrize("cfg,match", [
    (LowRankConfig(budget_block_size=64), "too small for rank 1"),            # 96x64 at b=64: 128 weights
    (LowRankConfig(rank=65), r"rank must be in 1\.\.64"),
    (BlockDiagonalConfig(num_blocks=0), r"num_blocks must be in 1\.\.64"),
    (HybridConfig(budget_block_size=32), "too small for a circulant of block size 64 plus rank 1"),
    (HybridConfig(budget_block_size=64), "larger than the layer's smaller dimension"),  # part of 128
    (LowRankConfig(budget_block_size=128), "larger than the layer's smaller dimension"),
])
def test_impossible_budgets_are_refused_and_model_unchanged(cfg, match):
    model = tiny_model("llama", layers=2)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        compress_(model, cfg)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(isinstance(m, nn.Linear) for n, m in model.named_modules() if n.endswith("proj"))


def config_for(structure, **options):
    from bcllm.fit.student import StudentSpec, config_for as spec_config

    return spec_config(StudentSpec(structure=structure, **options))


def test_config_for_rules():
    where = dict(targets="mlp", layers="all")
    assert config_for("circulant", block_size=8) == CirculantConfig(block_size=8, **where)
    assert config_for("circulant", block_size=8, param_budget=32) == CirculantConfig(block_size=32, **where)
    assert config_for("lowrank", block_size=8).budget_block_size == 8
    assert config_for("lowrank", rank=4).rank == 4
    assert config_for("blockdiag", param_budget=16).budget_block_size == 16
    assert config_for("hybrid", param_budget=16).block_size == 32
    h = config_for("hybrid", block_size=8, rank=3)
    assert (h.block_size, h.rank, h.budget_block_size) == (8, 3, None)
    with pytest.raises(ValueError, match="allowed: circulant, lowrank, blockdiag, hybrid"):
        config_for("sparse")
    with pytest.raises(ValueError, match="^rank applies to lowrank and hybrid"):
        config_for("blockdiag", rank=3)
    with pytest.raises(ValueError, match="not both"):
        config_for("lowrank", rank=3, param_budget=16)
    with pytest.raises(ValueError, match="exactly one of rank or budget_block_size"):
        LowRankConfig()


def test_summary_reports_actual_sizes_and_budget():
    model = tiny_model("llama", layers=2)
    summary = compress_(model, LowRankConfig(budget_block_size=8, targets="mlp"))
    # 96x64 and 64x96 layers: circulant b=8 has 96*64/8 = 768 weights -> rank 768 // 160 = 4
    assert set(summary["sizes"]) == set(summary["modules"]) and len(summary["modules"]) == 6
    assert all(size == {"rank": 4} for size in summary["sizes"].values())
    assert summary["budget_params"] == 6 * 768
    assert summary["structured_params"] == 6 * 4 * 160


def test_checkpoint_roundtrip_of_a_structure(tmp_path):
    from bcllm.io.checkpoint import load_fitted, save_fitted

    teacher = tiny_model("llama", layers=2)
    student = copy.deepcopy(teacher)
    cfg = BlockDiagonalConfig(budget_block_size=8, targets=["up_proj"])
    compress_(student, cfg)
    student.model.layers[1].mlp.up_proj.blocks.mul_(2)  # as if fitted
    save_fitted(student, tmp_path, cfg)
    fresh = copy.deepcopy(teacher)
    load_fitted(fresh, tmp_path)
    ids = torch.randint(0, 128, (1, 8))
    assert torch.equal(fresh(ids).logits, student(ids).logits)


def test_sequential_fit_and_distillation_take_any_structure():
    """The other calibration paths: sequential fit (x_s != x_t) and distillation train a low-rank student."""
    from bcllm.fit.closed_form import fit_sequential_
    from bcllm.fit.distill import DistillConfig, distill_

    teacher = tiny_model("llama", layers=2)
    torch.manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 128, (8, 64)), "attention_mask": torch.ones(8, 64, dtype=torch.long)}]
    ids = batches[0]["input_ids"]
    ref = teacher(ids).logits
    student = copy.deepcopy(teacher)
    compress_(student, LowRankConfig(budget_block_size=8))
    plain = (student(ids).logits - ref).norm()
    fit_sequential_(student, teacher, batches, progress=False)
    fitted = (student(ids).logits - ref).norm()
    assert fitted < plain
    before = student.model.layers[0].mlp.up_proj.up.clone()
    with torch.enable_grad():
        distill_(student, teacher, batches, cfg=DistillConfig(steps=3, eval_every=100, checkpoint_every=100),
                 progress=False)
    assert not torch.equal(student.model.layers[0].mlp.up_proj.up, before)


@pytest.mark.slow
def test_smollm2_budget_16_sizes(smollm2):
    model, tok = smollm2
    model = copy.deepcopy(model)
    ids = tok("Explain what a circulant matrix is.", return_tensors="pt").input_ids
    for cfg, size in [(LowRankConfig(budget_block_size=16, layers="12"), {"rank": 26}),
                      (BlockDiagonalConfig(budget_block_size=16, layers="13"), {"num_blocks": 16}),
                      (HybridConfig(budget_block_size=16, layers="14"), {"block_size": 32, "rank": 13})]:
        summary = compress_(model, cfg)
        assert summary["num_modules"] == 3 and list(summary["sizes"].values()) == [size] * 3
        assert summary["structured_params"] <= summary["budget_params"] == 3 * 1536 * 576 // 16
    assert torch.isfinite(model(ids).logits).all()


def test_model_costs_counts_each_structure_once():
    """structures.costs.model_costs sums every structure's own costs(); a hybrid's circulant part is not counted twice."""
    from bcllm.structures import model_costs

    dense = model_costs(tiny_model("llama", layers=2))
    for cfg in (LowRankConfig(rank=4, targets="mlp"), HybridConfig(block_size=16, rank=2, targets="mlp")):
        model = tiny_model("llama", layers=2)
        compress_(model, cfg)
        got = model_costs(model)
        structured = [m for n, m in model.named_modules() if n.endswith(("gate_proj", "up_proj", "down_proj"))]
        assert got["structured_layers"] == 6 == len(structured)
        assert got["dense_layers"] == dense["dense_layers"] - 6
        assert got["params"] == dense["params"] - 6 * 64 * 96 + sum(m.num_params for m in structured)
