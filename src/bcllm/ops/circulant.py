"""Block-circulant math: pure tensor functions, no modules. The product, the spectra and their
cache come from ops.circulant_math (torch only, copied verbatim into exported models) and are
re-exported here; this file adds the fits, the dense form and the dispatch to the C++ kernel.

Convention (docs/DESIGN.md section 1): a weight W of shape (out, in) = (p*b, q*b)
is a p x q grid of circulant blocks stored as c[p, q, b], where block (i, j) is

    C_ij[r, s] = c[i, j, (r - s) mod b]        (c[i, j] is the block's first column)

so C_ij @ x = irfft(rfft(c_ij) * rfft(x)). Dimensions that b does not divide are
zero-padded up to p*b and q*b; the padding is never data.
"""

from __future__ import annotations

import contextlib
import math

import torch

from . import kernel
from .circulant_math import (DFT_MATMUL_MAX_BLOCK, cached_spectra, circulant_matmul_planar, dft_tables, fold_nyquist,
                             grid_shape, spectra, spectra_to_c, stored_frequencies, unfold_nyquist)
from ..errors import InputError

__all__ = ["DFT_MATMUL_MAX_BLOCK", "cached_spectra", "circulant_matmul_planar", "dft_tables", "fold_nyquist",
           "grid_shape", "spectra", "spectra_to_c", "stored_frequencies", "unfold_nyquist", "project_frobenius",
           "to_dense", "block_spectra", "circulant_matmul", "uses_kernel", "SPECTRA_BITS", "quantize_spectra",
           "dequantize_spectra", "quantized_spectra", "kernel_threads", "single_thread",
           "fit_aware", "KERNEL_MAX_ROWS", "SINGLE_THREAD_MAX_BYTES", "KERNEL_SINGLE_THREAD_MAX_BYTES"]


def _diagonal_index(block_size: int, device=None) -> torch.Tensor:
    """k = (r - s) mod b for every entry (r, s) of a b x b block, flattened row-major."""
    r = torch.arange(block_size, device=device)
    return ((r[:, None] - r[None, :]) % block_size).reshape(-1)


def _to_blocks(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """(out, in) -> (p, q, b*b) zero-padded blocks, each flattened row-major."""
    out_features, in_features = weight.shape
    p, q = grid_shape(out_features, in_features, block_size)
    padded = torch.nn.functional.pad(weight, (0, q * block_size - in_features, 0, p * block_size - out_features))
    return padded.reshape(p, block_size, q, block_size).permute(0, 2, 1, 3).reshape(p, q, block_size * block_size)


def project_frobenius(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """Nearest block-circulant matrix to `weight` in Frobenius norm, as c[p, q, b].

    Each c_ij[k] is the mean of block (i, j)'s wrapped diagonal k over the entries
    that exist (padding excluded). One index_add over all b*b entries, no Python loop.
    """
    if weight.dim() != 2:
        raise InputError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float64)
    idx = _diagonal_index(block_size, w.device)
    blocks = _to_blocks(w, block_size)
    p, q, _ = blocks.shape
    sums = torch.zeros(p, q, block_size, dtype=torch.float64, device=w.device).index_add_(2, idx, blocks)
    counts = torch.zeros_like(sums).index_add_(2, idx, _to_blocks(torch.ones_like(w), block_size))
    return (sums / counts.clamp_min(1)).to(weight.dtype if weight.is_floating_point() else torch.float32)


def to_dense(c: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Explicit (out, in) matrix of the block-circulant c[p, q, b], padding cropped."""
    p, q, b = c.shape
    idx = _diagonal_index(b, c.device)
    blocks = c[..., idx].reshape(p, q, b, b)  # blocks[i, j, r, s] = c[i, j, (r - s) mod b]
    return blocks.permute(0, 2, 1, 3).reshape(p * b, q * b)[:out_features, :in_features]


def block_spectra(x: torch.Tensor, in_features: int, block_size: int) -> torch.Tensor:
    """Input rows (N, in) -> spectra of their blocks, frequency-major (b//2 + 1, N, q) complex."""
    q = math.ceil(in_features / block_size)
    x = torch.nn.functional.pad(x, (0, q * block_size - in_features))
    return torch.fft.rfft(x.reshape(x.shape[0], q, block_size), dim=-1).permute(2, 0, 1)


# Up to this many rows circulant_matmul hands float32 CPU rows to the fused kernel (bcllm.ops.kernel):
# the kernel streams the spectra once per call but does each row's work separately, and from 8
# rows the planar path's matmuls win on large layers (`python scripts/kernel_rows.py`, cold,
# 2-core Xeon, kernel vs planar us at 1/2/4/8 rows: 576x1536 b=16 20/26/36/74 vs 44/46/68/85;
# 11008x4096 b=64 215/259/356/655 vs 281/293/369/588).
KERNEL_MAX_ROWS = 4
# Products of few rows with spectra up to this size run on one thread when they take the torch
# path: they gain nothing from a second one, and on a busy machine each parallel region waits
# for a descheduled thread (measured on 2 loaded cores, 1 row: 1536x576 b=16 median 60 ms at 2
# threads, 0.15 ms at 1; 11008x4096 b=64 82 ms vs 6 ms).
SINGLE_THREAD_MAX_BYTES = 4 << 20
# The same for the fused kernel (bcllm.ops.kernel), which runs one parallel region per call (about
# 1.5 us to start and join). One core streams ~10 GB/s from memory here, so from a few hundred KB
# on the second core pays: on a 2-core Xeon, 1 row, cold, median us at 1 vs 2 threads:
# 1536x576 b=16 (216 KB) 22.6 vs 19.8, 3072x576 (the fused gate+up, 432 KB) 44 vs 34,
# 576x1536 23.7 vs 19, 11008x4096 b=64 (2.8 MB) 377 vs 198; 1024x576 (144 KB) 14 vs 14.
KERNEL_SINGLE_THREAD_MAX_BYTES = 128 << 10


@contextlib.contextmanager
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def kernel_threads(spectra: torch.Tensor) -> int:
    """The fused kernel's `threads` for these spectra (float32, or int8 codes): 1 up to
    KERNEL_SINGLE_THREAD_MAX_BYTES, else 0 (all of torch's threads, counted by the kernel: a
    compiled graph cannot ask torch)."""
    return 1 if spectra.numel() * spectra.element_size() <= KERNEL_SINGLE_THREAD_MAX_BYTES else 0


def uses_kernel(x: torch.Tensor, spectra: torch.Tensor) -> bool:
    """Whether circulant_matmul hands the float32 rows `x` to the fused kernel (bcllm.ops.kernel)."""
    return x.shape[0] <= KERNEL_MAX_ROWS and kernel.applies(x, spectra)


def circulant_matmul(x: torch.Tensor, spectra: torch.Tensor, out_features: int, in_features: int,
                     block_size: int, quantized: tuple | None = None) -> torch.Tensor:
    """y = x @ W.T for the block-circulant W with planar `spectra` (2, F, q, p); `quantized`: the
    int8 (codes, scales) whose dequantised values `spectra` are (quantized_spectra), which the fused
    kernel reads instead (a quarter of the bytes).

    x: (N, in), computed in float32 whatever its dtype (no 16-bit FFT on the CPU, none for bf16
    on CUDA, fp16 there only for powers of two). Returns (N, out) float32 (a view: may be
    non-contiguous when out is not a multiple of b). Up to KERNEL_MAX_ROWS rows on the CPU
    without gradients the fused kernel (bcllm.ops.kernel) where it is built, else the planar path.
    """
    if x.dtype != torch.float32:
        x = x.float()
    if uses_kernel(x, spectra):  # fused C++ kernel (float32 whatever autocast says)
        if quantized is not None:
            threads = kernel_threads(quantized[0])
            if torch.compiler.is_compiling():
                return kernel.circulant_decode_int8_op(x, *quantized, out_features, in_features, block_size, threads)
            return kernel.circulant_decode_int8(x, *quantized, out_features, in_features, block_size, threads)
        threads = kernel_threads(spectra)
        if torch.compiler.is_compiling():  # an operator the graph can hold (bench.lean_decode's compile)
            return kernel.circulant_decode_op(x, spectra, out_features, in_features, block_size, threads)
        return kernel.circulant_decode(x, spectra, out_features, in_features, block_size, threads)
    if torch.is_autocast_enabled(x.device.type):  # else the matmuls drop to 16 bits
        with torch.autocast(x.device.type, enabled=False):
            return circulant_matmul(x, spectra, out_features, in_features, block_size, quantized)
    if (x.shape[0] <= KERNEL_MAX_ROWS and x.device.type == "cpu" and spectra.numel() * 4 <= SINGLE_THREAD_MAX_BYTES
            and not torch.compiler.is_compiling() and torch.get_num_threads() > 1):  # (a thread count breaks a graph)
        with single_thread():
            return circulant_matmul_planar(x, spectra, out_features, in_features, block_size)
    return circulant_matmul_planar(x, spectra, out_features, in_features, block_size)


# Bits a spectrum value is stored in: 32 (float32) or 8 (int8 codes, a float32 scale per frequency
# and output block).
SPECTRA_BITS = (32, 8)


def quantize_spectra(planar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Planar spectra (2, F, q, p) -> (codes (2, F, q, p) int8, scales (F, p) float32): symmetric
    round to nearest with one scale per frequency and output block, shared by the real and the
    imaginary part and by all q input blocks (max |value| / 127). A scale per output block, not per
    input block, factors out of the product's sum over input blocks: the kernel applies it once
    per output sum (and the scales of gate and up side by side are the fused MLP's)."""
    scales = planar.detach().abs().amax(dim=(0, 2)).float() / 127
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(planar.detach().float() / scales[None, :, None, :]).clamp_(-127, 127).to(torch.int8)
    return codes, scales


def dequantize_spectra(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 planar spectra int8 `codes` and `scales` stand for: codes * scale."""
    return codes.float() * scales[None, :, None, :]


def quantized_spectra(owner, c: torch.Tensor, *more: torch.Tensor) -> tuple:
    """(planar, (codes, scales)), circulant_matmul's spectra and quantized: the spectra of c (as cached_spectra, with `more`) rounded to int8
    (quantize_spectra), planar the dequantised values: cached on owner._quantized beside the float
    spectra they come from. Under autograd (spectra computed afresh) planar is the straight-through
    estimate: the rounded values forward, the float spectra's gradient backward."""
    if torch.compiler.is_compiling() and owner._quantized is not None and owner._quantized[0] is owner._spectra:
        return owner._quantized[1:]
    s = cached_spectra(owner, c, *more)
    if s.requires_grad:
        codes, scales = quantize_spectra(s)
        return s + (dequantize_spectra(codes, scales) - s).detach(), (codes, scales)
    if owner._quantized is None or owner._quantized[0] is not s:
        with torch.inference_mode(False), torch.no_grad():  # (as cached_spectra: no inference tensors kept)
            codes, scales = quantize_spectra(s)
            owner._quantized = (s, dequantize_spectra(codes, scales), (codes, scales))
    return owner._quantized[1:]


def _block_dft(m: torch.Tensor, rows: int, cols: int, block_size: int) -> torch.Tensor:
    """(rows*b, cols*b) real -> (F, rows, cols) complex:  D^H M_jk D for every b x b block,
    D[s, f] = exp(-2 pi i f s / b).  Turns second moments of inputs/outputs into the
    per-frequency moments of their block spectra without ever forming token spectra."""
    z = torch.fft.rfft(m.reshape(rows, block_size, cols, block_size), dim=-1)    # sum_t M[s, t] D[t, f]
    z = torch.fft.ifft(z, dim=1) * block_size                                   # sum_s conj(D[s, g]) ..., all g
    f = torch.arange(block_size // 2 + 1, device=m.device)
    return z[:, f, :, f]                                                        # g = f: (F, rows, cols)


def fit_aware(weight: torch.Tensor, xx: torch.Tensor, xt: torch.Tensor, block_size: int,
              ridge: float = 1e-4) -> torch.Tensor:
    """Block-circulant c[p, q, b] minimising sum_n ||C x_s,n - W x_t,n||^2 (DESIGN.md section 2).

    weight: (out, in) original dense weight W; xx = sum x_s x_s^T, xt = sum x_s x_t^T, both (in, in).
    Per frequency f (rfft half), G_f = D^H xx D and R_f = D^H (xt W^T) D blockwise, then
    (G_f + ridge * mean(diag G_f) I) C_f^T = R_f, one batched complex solve in float64.
    DC and Nyquist are real. A partial last block row (out not divisible by b) would be
    fitted to padding zeros in the frequency domain, so it is solved exactly in the time
    domain over the rows that exist.
    """
    if weight.dim() != 2 or xx.shape != (weight.shape[1],) * 2 or xt.shape != xx.shape:
        raise InputError(f"fit_aware: weight (out, in) needs xx and xt of shape (in, in); got weight "
                         f"{tuple(weight.shape)}, xx {tuple(xx.shape)}, xt {tuple(xt.shape)}")
    out_features, in_features = weight.shape
    b = block_size
    p, q = grid_shape(out_features, in_features, b)
    w = weight.detach().to(torch.float64)
    xx = xx.to(device=w.device, dtype=torch.float64)
    # sum x_s y_t^T, (in, out); in the weight's precision (float32 weights: float32 product, ample for a ridge fit)
    wdtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    cross = (xt.to(device=w.device, dtype=wdtype) @ weight.detach().to(wdtype).T).to(torch.float64)
    pad_in = q * b - in_features
    xx_p = torch.nn.functional.pad(xx, (0, pad_in, 0, pad_in))
    cross_p = torch.nn.functional.pad(cross, (0, p * b - out_features, 0, pad_in))

    gram = _block_dft(xx_p, q, q, b)                                             # (F, q, q)
    rhs = _block_dft(cross_p, q, p, b)                                           # (F, q, p)
    scale = gram.diagonal(dim1=1, dim2=2).real.mean(dim=1).clamp_min(1e-30)    # (F,)
    eye = torch.eye(q, dtype=gram.dtype, device=w.device)
    c_hat = torch.linalg.solve(gram + (ridge * scale)[:, None, None] * eye, rhs)  # (F, q, p)
    c_hat[0] = c_hat[0].real
    if b % 2 == 0:
        c_hat[-1] = c_hat[-1].real
    c = torch.fft.irfft(c_hat.permute(2, 1, 0), n=b, dim=-1)

    rows_left = out_features - (p - 1) * b
    if rows_left < b:  # partial last block row: exact least squares over its existing rows
        # output row r of block row p-1 is sum_{j,k} c[p-1, j, k] x[j*b + (r - k) mod b]
        k = torch.arange(b, device=w.device)
        j = torch.arange(q, device=w.device)
        normal = torch.zeros(q * b, q * b, dtype=torch.float64, device=w.device)
        target = torch.zeros(q * b, dtype=torch.float64, device=w.device)
        for r in range(rows_left):
            idx = (j[:, None] * b + (r - k[None, :]) % b).reshape(-1)            # (q*b,)
            normal += xx_p[idx][:, idx]
            target += cross_p[idx, (p - 1) * b + r]
        lam = ridge * normal.diagonal().mean().clamp_min(1e-30)
        # pseudo-inverse: with padding on both sides some c entries may touch no real entry
        sol = torch.linalg.pinv(normal + lam * torch.eye(q * b, dtype=torch.float64, device=w.device),
                                hermitian=True) @ target
        c[p - 1] = sol.reshape(q, b)
    return c.to(weight.dtype if weight.is_floating_point() else torch.float32)
