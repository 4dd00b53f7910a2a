"""Block-circulant math and module against explicit dense references."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from bcllm.ops import circulant
from bcllm.structures import BlockCirculantLinear

torch.set_default_dtype(torch.float32)


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def explicit_block(c_ij):
    """C[r, s] = c[(r - s) mod b], built entry by entry (independent of the vectorised code)."""
    b = len(c_ij)
    return torch.tensor([[c_ij[(r - s) % b].item() for s in range(b)] for r in range(b)], dtype=c_ij.dtype)


def explicit_dense(c, out_features, in_features):
    p, q, b = c.shape
    rows = [torch.cat([explicit_block(c[i, j]) for j in range(q)], dim=1) for i in range(p)]
    return torch.cat(rows, dim=0)[:out_features, :in_features]


@pytest.mark.parametrize("out_f,in_f,b", [(8, 6, 2), (9, 7, 3), (16, 24, 8), (10, 13, 4), (5, 5, 5), (4, 4, 1)])
def test_to_dense_matches_explicit_definition(out_f, in_f, b):
    p, q = circulant.grid_shape(out_f, in_f, b)
    c = torch.randn(p, q, b, dtype=torch.float64)
    assert torch.allclose(circulant.to_dense(c, out_f, in_f), explicit_dense(c, out_f, in_f))


@settings(max_examples=40, deadline=None)
@given(b=st.sampled_from([1, 2, 3, 8, 16, 64]), p=st.integers(1, 3), q=st.integers(1, 3),
       crop_out=st.integers(0, 7), crop_in=st.integers(0, 7), n=st.integers(1, 5), bias=st.booleans())
def test_module_product_matches_dense(b, p, q, crop_out, crop_in, n, bias):
    out_f = max(b, p * b - min(crop_out, b - 1))
    in_f = max(b, q * b - min(crop_in, b - 1))
    layer = BlockCirculantLinear(in_f, out_f, b, bias=bias)
    with torch.no_grad():
        if bias:
            layer.bias.normal_()
    x = torch.randn(2, n, in_f)
    y = layer(x)
    dense = layer.to_dense()
    ref = x @ dense.T + (layer.bias if bias else 0)
    assert y.shape == (2, n, out_f)
    assert rel_err(y.detach(), ref.detach()) < 1e-4


def test_block_size_one_reproduces_dense_layer():
    lin = torch.nn.Linear(12, 7)
    bc = BlockCirculantLinear.from_linear(lin, 1)
    x = torch.randn(3, 12)
    assert torch.allclose(bc.to_dense(), lin.weight)
    assert rel_err(bc(x).detach(), lin(x).detach()) < 1e-6


@pytest.mark.parametrize("out_f,in_f,b", [(8, 8, 4), (12, 8, 4), (7, 10, 3), (6, 9, 4)])
def test_frobenius_projection_is_least_squares_optimum(out_f, in_f, b):
    """Compare with lstsq over the explicit basis of block-circulant matrices."""
    torch.manual_seed(0)
    w = torch.randn(out_f, in_f, dtype=torch.float64)
    p, q = circulant.grid_shape(out_f, in_f, b)
    basis = []
    for i, j, k in itertools.product(range(p), range(q), range(b)):
        c = torch.zeros(p, q, b, dtype=torch.float64)
        c[i, j, k] = 1
        basis.append(explicit_dense(c, out_f, in_f).reshape(-1))
    A = torch.stack(basis, dim=1)
    coef = torch.linalg.lstsq(A, w.reshape(-1, 1), driver="gelsd").solution.reshape(-1)
    best = (A @ coef).reshape(out_f, in_f)
    c = circulant.project_frobenius(w, b)
    ours = circulant.to_dense(c, out_f, in_f)
    assert torch.allclose(ours, best, atol=1e-10)
    # coefficients of real (non-padded) diagonals agree too
    used = A.abs().sum(0) > 0
    assert torch.allclose(c.reshape(-1)[used], coef[used], atol=1e-10)


@pytest.mark.parametrize("b", [2, 3, 8])
def test_frobenius_projection_is_idempotent(b):
    w = torch.randn(3 * b - 1, 2 * b + 1, dtype=torch.float64)
    once = circulant.to_dense(circulant.project_frobenius(w, b), *w.shape)
    twice = circulant.to_dense(circulant.project_frobenius(once, b), *w.shape)
    assert torch.allclose(once, twice, atol=1e-12)


@pytest.mark.parametrize("b", [1, 2, 3, 7, 8, 16])
def test_spectra_roundtrip(b):
    c = torch.randn(3, 4, b)
    assert torch.allclose(circulant.spectra_to_c(circulant.spectra(c), b), c, atol=1e-6)


@pytest.mark.parametrize("b", [1, 2, 5, 8, 16, 64])
def test_spectra_layout_is_folded_rfft(b):
    """Against numpy's rfft, element by element: real parts, then imaginary parts, frequency-major,
    and for even b the real Nyquist value in frequency 0's imaginary place, so b floats per block."""
    c = torch.randn(3, 5, b, dtype=torch.float64)
    z = np.fft.rfft(c.numpy(), axis=-1)  # (p, q, b//2 + 1)
    spec = circulant.spectra(c).double()
    F = (b + 1) // 2
    assert spec.shape == (2, F, 5, 3)
    for f in range(F):
        assert np.allclose(spec[0, f].numpy(), z[..., f].real.T, atol=1e-5)
        nyquist = f == 0 and b % 2 == 0
        assert np.allclose(spec[1, f].numpy(), (z[..., b // 2].real if nyquist else z[..., f].imag).T, atol=1e-5)
    if b % 2 == 0:
        assert spec.numel() == c.numel()


def test_gradients_match_finite_differences():
    """Finite differences in float64 on the pure product, then the float32 module against it."""
    torch.manual_seed(0)
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)

    def pure(c, x):
        spec = torch.fft.rfft(c, dim=-1).permute(2, 1, 0)
        x_hat = circulant.block_spectra(x, 7, 3)
        y_hat = torch.bmm(x_hat, spec)
        return torch.fft.irfft(y_hat.permute(1, 2, 0), n=3, dim=-1).reshape(4, -1)[:, :5]

    assert torch.autograd.gradcheck(pure, (c, x))
    # and the module's float32 gradient agrees with the float64 one
    layer32 = BlockCirculantLinear(7, 5, 3, bias=False)
    with torch.no_grad():
        layer32.c.copy_(c.detach().float())
    layer32(x.detach().float()).sum().backward()
    c.grad = None
    pure(c, x.detach()).sum().backward()
    assert rel_err(layer32.c.grad.double(), c.grad) < 1e-5


def test_spectra_cache_follows_parameter_updates():
    layer = BlockCirculantLinear(16, 16, 4, bias=False)
    x = torch.randn(2, 16)
    with torch.no_grad():
        y0 = layer(x)
        layer.c.mul_(2)  # in-place change must invalidate the cache
        y1 = layer(x)
    assert torch.allclose(y1, 2 * y0, atol=1e-5)
    # training step through an optimizer
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).pow(2).sum().backward()
    opt.step()
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ layer.to_dense().T, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    layer = BlockCirculantLinear(32, 24, 8).to(dtype)
    x = torch.randn(5, 32).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    ref = x.float() @ layer.to_dense().float().T + layer.bias.float()
    assert rel_err(y.float().detach(), ref.detach()) < 1e-2


def test_inference_mode_then_grad_mode():
    layer = BlockCirculantLinear(8, 8, 4)
    x = torch.randn(3, 8)
    with torch.inference_mode():
        layer(x)
    layer.eval()
    with torch.no_grad():
        y = layer(x)
    assert torch.allclose(y, x @ layer.to_dense().T + layer.bias, atol=1e-5)


@pytest.mark.parametrize("bad", [0, -2, 9])
def test_bad_block_size(bad):
    with pytest.raises(ValueError, match="block_size"):
        BlockCirculantLinear(8, 12, bad)


def test_wrong_input_width():
    with pytest.raises(ValueError, match="last dimension 8"):
        BlockCirculantLinear(8, 8, 4)(torch.randn(2, 9))
