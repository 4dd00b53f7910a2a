"""The block-circulant product in torch alone: spectra of c, the frequency-domain product, the
folded frequency layout, and the spectra cache. bcllm.ops.circulant re-exports these; `bcllm export`
copies this file verbatim next to the exported modeling_bcllm.py, which imports it relatively, so
the package and the exported model compute with the same code. Imports torch and the standard
library only (math, functools).

Convention (docs/DESIGN.md section 1): a weight W of shape (out, in) = (p*b, q*b) is a p x q grid
of circulant blocks stored as c[p, q, b], block (i, j)[r, s] = c[i, j, (r - s) mod b] (c[i, j] is
the block's first column), so C_ij @ x = irfft(rfft(c_ij) * rfft(x)). Dimensions that b does not
divide are zero-padded up to p*b and q*b; the padding is never data.
"""

import functools
import math

import torch


def grid_shape(out_features: int, in_features: int, block_size: int) -> tuple:
    """(p, q): number of block rows and block columns, padding included."""
    return math.ceil(out_features / block_size), math.ceil(in_features / block_size)


def stored_frequencies(block_size: int) -> int:
    """F, the frequencies a spectra tensor holds: ceil(b / 2). For even b the Nyquist frequency
    b/2 is folded into frequency 0 (below), so that F*2 = b floats per block, as many as c."""
    return (block_size + 1) // 2


def fold_nyquist(z: torch.Tensor, block_size: int) -> torch.Tensor:
    """rfft output (..., b//2 + 1) complex -> (..., F): for even b the Nyquist value (real for real
    input) replaces the imaginary part of frequency 0 (zero for real input), the halfcomplex
    packing of real FFT libraries. Odd b has no Nyquist frequency: unchanged."""
    if block_size % 2:
        return z
    return torch.cat([torch.complex(z[..., :1].real, z[..., -1:].real), z[..., 1:-1]], dim=-1)


def unfold_nyquist(z: torch.Tensor, block_size: int) -> torch.Tensor:
    """Inverse of fold_nyquist: (..., F) -> (..., b//2 + 1) complex, ready for irfft."""
    if block_size % 2:
        return z
    zero = torch.zeros_like(z[..., :1].real)
    return torch.cat([torch.complex(z[..., :1].real, zero), z[..., 1:], torch.complex(z[..., :1].imag, zero)], dim=-1)


def spectra(c: torch.Tensor) -> torch.Tensor:
    """Planar frequency-major spectra (2, F, q, p) float32 of c[p, q, b], F = ceil(b / 2):
    [0] the real parts, [1] the imaginary parts of rfft(c), with (even b) the real Nyquist value
    in the place of frequency 0's zero imaginary part (DESIGN.md section 4).

    y_hat[f] = x_hat[f] @ (spectra[0, f] + i spectra[1, f]) for f > 0, and at f = 0 the two real
    parts multiply separately: per part one batched real matmul over frequencies. For even b that
    is exactly b floats per block, as many as c: no byte stored twice, none that is always zero.
    """
    b = c.shape[-1]
    return torch.view_as_real(fold_nyquist(torch.fft.rfft(c.float(), dim=-1), b)).permute(3, 2, 1, 0).contiguous()


def spectra_to_c(planar: torch.Tensor, block_size: int) -> torch.Tensor:
    """Inverse of `spectra`: (2, F, q, p) -> c[p, q, b] real."""
    z = unfold_nyquist(torch.complex(planar[0], planar[1]).permute(2, 1, 0), block_size)
    return torch.fft.irfft(z, n=block_size, dim=-1)


def cached_spectra(owner, c: torch.Tensor, *more: torch.Tensor) -> torch.Tensor:
    """Spectra of c (with `more`: of torch.cat([c, *more]), block rows stacked), cached on the
    module `owner` as owner._spectra under owner._spectra_key (both None at first): recomputed only
    when a c changes (its version counter moves, or its storage: a move to another device).
    Computed afresh, uncached, when gradients must flow to c; while torch.compile captures a
    graph, the cache as it is (built before compiling, the graph holds it)."""
    if torch.compiler.is_compiling() and owner._spectra is not None:
        return owner._spectra
    if torch.is_grad_enabled() and (c.requires_grad or any([m.requires_grad for m in more])):
        return spectra(torch.cat([c, *more]) if more else c)
    key = (c._version, c.data_ptr())
    if more:
        key += tuple([k for m in more for k in (m._version, m.data_ptr())])
    if owner._spectra_key != key:
        with torch.inference_mode(False), torch.no_grad():  # an inference tensor would break later autograd use
            owner._spectra = spectra(torch.cat([c, *more]) if more else c)
        owner._spectra_key = key
    return owner._spectra


# Up to this block size the block DFTs run as real matmuls against (2F, b) tables, which also
# produce the layout the products need; above it an FFT and a layout copy cost less (a table
# costs 2b multiply-adds per value, more than the product's own from about b = 128).
DFT_MATMUL_MAX_BLOCK = 64


@functools.lru_cache(maxsize=None)
def dft_tables(block_size: int, device: torch.device) -> tuple:
    """(forward, inverse_p, inverse_q), each (2F, b) float32, rows ordered (frequency, part).

    forward @ x_block gives rows (Re, Im) of the folded rfft(x_block) per frequency. With
    P = X S_re and Q = X S_im (X's rows per frequency: the Re rows, then the Im rows),
    Re y_hat = P_re - Q_im and Im y_hat = P_im + Q_re, so irfft(y_hat) = inverse_p.T @ P +
    inverse_q.T @ Q: the complex combination and the inverse DFT in two matmuls. At f = 0 with
    even b the "Im" rows hold the Nyquist part: y_hat[0] = P_re and y_hat[b/2] = Q_im there."""
    b, F = block_size, stored_frequencies(block_size)
    angle = 2 * math.pi * torch.arange(F, dtype=torch.float64)[:, None] * torch.arange(b)[None, :] / b
    weight = torch.full((F, 1), 2.0, dtype=torch.float64)  # irfft counts the mirrored half twice...
    weight[0] = 1  # ...but not f = 0 (the Nyquist frequency, also counted once, is not a row of its own)
    re, im = weight * torch.cos(angle) / b, -weight * torch.sin(angle) / b  # coefficients of Re, Im y_hat[f]
    forward = torch.stack([torch.cos(angle), -torch.sin(angle)], 1)    # (F, 2, b) -> (2F, b)
    inverse_p = torch.stack([re, im], 1)    # P's rows: Re x * S_re -> Re y_hat, Im x * S_re -> Im y_hat
    inverse_q = torch.stack([im, -re], 1)   # Q's rows: Re x * S_im -> Im y_hat, Im x * S_im -> -Re y_hat
    if b % 2 == 0:  # frequency 0's Im rows carry the Nyquist frequency: x_hat[b/2], y_hat[b/2] = Q_im
        alternating = torch.cos(math.pi * torch.arange(b, dtype=torch.float64))  # (-1)^t
        forward[0, 1], inverse_q[0, 1] = alternating, alternating / b  # (inverse_p[0, 1], inverse_q[0, 0] are 0)
    with torch.inference_mode(False):  # a cached inference tensor would break later autograd use
        return tuple(t.reshape(2 * F, b).to(device=device, dtype=torch.float32)
                     for t in (forward, inverse_p, inverse_q))


def circulant_matmul_planar(x: torch.Tensor, spectra: torch.Tensor, out_features: int, in_features: int,
                            block_size: int) -> torch.Tensor:
    """y = x @ W.T for float32 rows x (N, in) and planar spectra (2, F, q, p), in real arithmetic:
    the block DFT as one matmul into X (F, 2N, q) (per frequency the Re rows, then the Im rows),
    P = X S_re and Q = X S_im as two batched real matmuls (each spectrum value read once), then
    the complex combination and inverse DFT as two matmuls reading P and Q transposed. No layout
    copies for b <= DFT_MATMUL_MAX_BLOCK; differentiable. Returns (N, out), padding cropped."""
    n, b = x.shape[0], block_size
    _, F, q, p = spectra.shape
    if q * b != in_features:
        x = torch.nn.functional.pad(x, (0, q * b - in_features))
    blocks = x.reshape(n * q, b)
    if b <= DFT_MATMUL_MAX_BLOCK:
        forward, inverse_p, inverse_q = dft_tables(b, x.device)
        x_hat = (forward @ blocks.T).view(F, 2 * n, q)
    else:
        x_hat = fold_nyquist(torch.fft.rfft(blocks, dim=-1), b)
        x_hat = torch.view_as_real(x_hat).view(n, q, F, 2).permute(2, 3, 0, 1).reshape(F, 2 * n, q)
    P, Q = torch.bmm(x_hat, spectra[0]), torch.bmm(x_hat, spectra[1])              # (F, 2N, p) each
    if b <= DFT_MATMUL_MAX_BLOCK:
        y = torch.addmm(P.view(2 * F, n * p).T @ inverse_p, Q.view(2 * F, n * p).T, inverse_q)  # (N*p, b)
    else:
        y_hat = torch.complex(P[:, :n] - Q[:, n:], P[:, n:] + Q[:, :n])            # (F, N, p)
        if b % 2 == 0:  # frequency 0 folded: its real part P_re, the Nyquist's Q_im (as a fold)
            y_hat = torch.cat([torch.complex(P[:1, :n], Q[:1, n:]), y_hat[1:]])
        y = torch.fft.irfft(unfold_nyquist(y_hat.permute(1, 2, 0), b), n=b, dim=-1)
    return y.reshape(n, p * b)[:, :out_features]
