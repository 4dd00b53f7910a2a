"""Block-circulant modules with int8 spectra (spectra_bits=8): the rounding, the kernel that reads the
codes, the module on every path, the fused MLP, saving, loading and the byte count."""

import pytest
import torch
from conftest import tiny_model
from test_circulant import explicit_dense
from test_kernel import ROWS, SHAPES, built, row_errors  # noqa: F401 (built: the kernel fixture)

from bcllm import CirculantConfig, compress_
from bcllm.errors import InputError
from bcllm.io.checkpoint import FORMAT_INT8_SPECTRA, load_fitted, save_fitted
from bcllm.ops import circulant, kernel
from bcllm.ops.costs import circulant_costs
from bcllm.structures import BlockCirculantLinear, FusedCirculantMLP
from bcllm.structures.base import fitted_modules
from bcllm.structures.circulant import bake_spectra_, rounded_c, set_spectra_bits_


def test_rounding_against_a_hand_computation():
    planar = torch.randn(2, 3, 4, 5)
    planar[:, 1, :, 2] = 0  # an all-zero column: scale 1, codes 0
    codes, scales = circulant.quantize_spectra(planar)
    assert codes.dtype == torch.int8 and codes.shape == planar.shape and scales.shape == (3, 5)
    for f in range(3):
        for j in range(5):
            top = max(abs(float(v)) for v in planar[:, f, :, j].reshape(-1))
            scale = top / 127 if top > 0 else 1.0
            assert scales[f, j].item() == pytest.approx(scale, rel=1e-6)
            for part in range(2):
                for i in range(4):
                    assert int(codes[part, f, i, j]) == round(float(planar[part, f, i, j]) / scale)
    back = circulant.dequantize_spectra(codes, scales)
    assert ((back - planar).abs() <= scales[None, :, None, :] / 2 + 1e-7).all()
    assert codes.abs().max() == 127


# p >= 16 output blocks: the vector tiles, a partial tile and the tail vector ending at column p
WIDE = [(256, 48, 16), (272, 40, 16), (528, 70, 16), (100, 70, 4), (1536, 576, 16), (576, 1536, 16), (1100, 130, 64)]


@pytest.mark.parametrize("out_f,in_f,b", SHAPES + WIDE)
def test_int8_kernel_matches_the_dequantised_spectra(built, out_f, in_f, b):
    torch.manual_seed(out_f + in_f + b)
    p, q = circulant.grid_shape(out_f, in_f, b)
    codes, scales = circulant.quantize_spectra(circulant.spectra(torch.randn(p, q, b)))
    dense = explicit_dense(circulant.spectra_to_c(circulant.dequantize_spectra(codes, scales).double(), b), out_f, in_f)
    for n in ROWS:
        x = torch.randn(n, in_f)
        ref = x.double() @ dense.T
        for threads in (1, 2):
            y = kernel.circulant_decode_int8(x, codes, scales, out_f, in_f, b, threads)
            assert y.shape == (n, out_f) and y.dtype == torch.float32
            assert row_errors(y, ref) < 1e-5, (n, threads)
            if threads == 1:  # the float kernel on the same wide shapes (its tests' shapes have p < 16)
                planar = circulant.dequantize_spectra(codes, scales)
                assert row_errors(kernel.circulant_decode(x, planar, out_f, in_f, b, 1), ref) < 1e-5, n


def test_int8_kernel_refuses_bad_scales(built):
    codes, scales = circulant.quantize_spectra(circulant.spectra(torch.randn(4, 3, 8)))
    with pytest.raises(InputError, match="scales must be contiguous float32"):
        kernel.circulant_decode_int8(torch.randn(1, 24), codes, scales[:, :3].contiguous(), 32, 24, 8, 1)
    with pytest.raises(InputError, match="codes must be int8"):
        kernel.circulant_decode_int8(torch.randn(1, 24), codes.float(), scales, 32, 24, 8, 1)


def int8_layer(in_f=70, out_f=100, b=16, seed=0):
    torch.manual_seed(seed)
    layer = BlockCirculantLinear(in_f, out_f, b, spectra_bits=8)
    with torch.no_grad():
        layer.bias.normal_()
    return layer


@pytest.mark.parametrize("out_f,in_f,b", [(100, 70, 16), (200, 130, 64), (10, 13, 3), (48, 48, 8)])
def test_module_computes_with_the_rounded_spectra_on_every_path(built, monkeypatch, out_f, in_f, b):
    layer = int8_layer(in_f, out_f, b)
    codes, scales = circulant.quantize_spectra(circulant.spectra(layer.c.detach()))
    c_rounded = circulant.spectra_to_c(circulant.dequantize_spectra(codes, scales).double(), b)
    dense = explicit_dense(c_rounded, out_f, in_f)
    assert torch.allclose(layer.to_dense().double(), dense, atol=1e-6)
    calls = []
    real = kernel.circulant_decode_int8
    monkeypatch.setattr(kernel, "circulant_decode_int8", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    with torch.no_grad():
        for n in (*ROWS, 40):  # up to KERNEL_MAX_ROWS the kernel, then the torch path
            x = torch.randn(n, in_f)
            assert row_errors(layer(x), x.double() @ dense.T + layer.bias.double()) < 1e-5, n
    assert calls == [n for n in ROWS if n <= circulant.KERNEL_MAX_ROWS]
    float_layer = BlockCirculantLinear(in_f, out_f, b)
    float_layer.load_state_dict(layer.state_dict())  # the same c, float spectra: another function
    x = torch.randn(3, in_f)
    with torch.no_grad():
        assert (float_layer(x) - layer(x)).abs().max() > 1e-4


def test_gradients_pass_straight_through_the_rounding():
    layer = int8_layer()
    float_layer = BlockCirculantLinear(70, 100, 16)
    float_layer.load_state_dict(layer.state_dict())
    x, g = torch.randn(5, 70), torch.randn(5, 100)
    y = layer(x)
    with torch.no_grad():
        assert torch.allclose(y, layer(x), atol=1e-5)  # forward: the rounded spectra, as without gradients
    (y * g).sum().backward()
    (float_layer(x) * g).sum().backward()
    # the product is linear in c: the straight-through gradient is the float layer's exactly
    assert torch.allclose(layer.c.grad, float_layer.c.grad, atol=1e-5)


def test_baking_keeps_the_function_and_the_codes():
    layer = int8_layer()
    x = torch.randn(6, 70)
    with torch.no_grad():
        before = layer(x)
        codes = circulant.quantize_spectra(circulant.spectra(layer.c))[0]
        model = torch.nn.Sequential(layer)
        assert bake_spectra_(model) == ["0"]
        after_codes = circulant.quantize_spectra(circulant.spectra(layer.c))[0]
        assert torch.equal(codes, after_codes)  # a baked c rounds to the same codes
        assert torch.allclose(layer(x), before, atol=1e-5)
        float_layer = BlockCirculantLinear(70, 100, 16)
        float_layer.load_state_dict(layer.state_dict())  # c alone now computes the int8 function
        assert torch.allclose(float_layer(x), before, atol=1e-5)
        assert torch.allclose(rounded_c(layer.c), layer.c, atol=1e-6)


def test_fused_mlp_with_int8_spectra_matches_its_layers(built):
    model = tiny_model("llama", layers=2)
    compress_(model, CirculantConfig(block_size=16, targets="mlp", spectra_bits=8))
    mlp = model.model.layers[0].mlp
    assert mlp.gate_proj.spectra_bits == 8
    fused = FusedCirculantMLP(mlp)
    with torch.no_grad():
        for n in (1, 3, 20):
            x = torch.randn(1, n, mlp.gate_proj.in_features)
            assert row_errors(fused(x)[0], mlp(x)[0].double()) < 1e-5


def test_cost_counts_codes_and_scales():
    out_f, in_f, b = 1536, 576, 16
    p, q, F = 96, 36, 8
    assert circulant_costs(out_f, in_f, b)["bytes"] == 2 * F * q * p * 4
    assert circulant_costs(out_f, in_f, b, spectra_bits=8)["bytes"] == 2 * F * q * p + 4 * F * p
    assert BlockCirculantLinear(in_f, out_f, b, bias=False, spectra_bits=8).costs()["bytes"] == 2 * F * q * p + 4 * F * p


def test_bad_spectra_bits_are_refused():
    with pytest.raises(InputError, match="spectra_bits must be one of 32, 8"):
        BlockCirculantLinear(16, 16, 4, spectra_bits=4)
    from bcllm import StudentSpec
    from bcllm.fit.student import config_for
    with pytest.raises(InputError, match="spectra_bits must be one of"):
        StudentSpec(spectra_bits=16)
    with pytest.raises(InputError, match="spectra_bits applies to structure circulant"):
        config_for(StudentSpec(structure="lowrank", spectra_bits=8))
    with pytest.raises(InputError, match="has none"):
        set_spectra_bits_(torch.nn.Sequential(torch.nn.Linear(4, 4)), 8)


def test_saved_int8_student_loads_the_same_function(tmp_path):
    model = tiny_model("llama", layers=2)
    student = tiny_model("llama", layers=2)
    student.load_state_dict(model.state_dict())
    config = CirculantConfig(block_size=8, targets="mlp", spectra_bits=8)
    compress_(student, config)
    ids = torch.randint(0, student.config.vocab_size, (2, 9))
    with torch.no_grad():
        logits = student(input_ids=ids).logits
    save_fitted(student, tmp_path / "s", config)
    import json
    assert json.loads((tmp_path / "s" / "fitted.json").read_text())["format"] == FORMAT_INT8_SPECTRA
    fresh = tiny_model("llama", layers=2)
    fresh.load_state_dict(model.state_dict())
    load_fitted(fresh, tmp_path / "s", check_fingerprint=False)
    assert fresh.model.layers[1].mlp.down_proj.spectra_bits == 8
    with torch.no_grad():
        assert torch.allclose(fresh(input_ids=ids).logits, logits, atol=1e-4)
    set_spectra_bits_(fresh, 32)  # the saved c alone (float spectra) computes the int8 function: it was baked
    set_spectra_bits_(student, 32)  # while the student's own c was left as it was (not on the grid)
    with torch.no_grad():
        baked = (fresh(input_ids=ids).logits - logits).abs().max()
        unbaked = (student(input_ids=ids).logits - logits).abs().max()
    assert baked < unbaked / 20, (baked, unbaked)


def test_rounding_a_saved_float_student_after_the_fact(tmp_path):
    from bcllm import StudentSpec
    from bcllm.fit.student import StudentIO, build_student
    model = tiny_model("llama", layers=2)
    config = CirculantConfig(block_size=8, targets="mlp")
    student = tiny_model("llama", layers=2)
    student.load_state_dict(model.state_dict())
    compress_(student, config)
    save_fitted(student, tmp_path / "s", config)
    loaded, summary = build_student(model, None, StudentSpec(spectra_bits=8), StudentIO(load=str(tmp_path / "s")))
    assert summary["config"]["spectra_bits"] == 8
    assert summary["structured_bytes"] == sum(m.costs()["bytes"] for m in fitted_modules(loaded).values())
    assert summary["structured_bytes"] < sum(m.c.numel() for m in fitted_modules(loaded).values()) * 4 / 3
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        float_logits = student(input_ids=ids).logits
    set_spectra_bits_(student, 8)  # the same rounding on the student in memory
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, student(input_ids=ids).logits, atol=1e-5)
        same = (loaded(input_ids=ids).logits - student(input_ids=ids).logits).abs().max()
        assert same < (loaded(input_ids=ids).logits - float_logits).abs().max() / 20  # the rounding happened


def test_a_forward_under_inference_mode_leaves_no_inference_tensors():
    layer = int8_layer()
    layer.c.requires_grad_(False)
    with torch.inference_mode():
        layer(torch.randn(3, 70))
    x = torch.randn(3, 70, requires_grad=True)
    layer(x).sum().backward()  # the cached rounded spectra can be saved for backward
    assert x.grad is not None
