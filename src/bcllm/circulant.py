"""Block-circulant math: pure tensor functions, no modules.

Convention (docs/DESIGN.md section 1): a weight W of shape (out, in) = (p*b, q*b)
is a p x q grid of circulant blocks stored as c[p, q, b], where block (i, j) is

    C_ij[r, s] = c[i, j, (r - s) mod b]        (c[i, j] is the block's first column)

so C_ij @ x = irfft(rfft(c_ij) * rfft(x)). Dimensions that b does not divide are
zero-padded up to p*b and q*b; the padding is never data.
"""

from __future__ import annotations

import math

import torch


def grid_shape(out_features: int, in_features: int, block_size: int) -> tuple[int, int]:
    """(p, q): number of block rows and block columns, padding included."""
    return math.ceil(out_features / block_size), math.ceil(in_features / block_size)


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
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
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


def spectra(c: torch.Tensor) -> torch.Tensor:
    """Frequency-major spectra (F, q, p) complex64 of c[p, q, b], F = b // 2 + 1.

    y_hat[f] = x_hat[f] @ spectra[f], one batched matmul over frequencies.
    """
    return torch.fft.rfft(c.float(), dim=-1).permute(2, 1, 0).contiguous()


def spectra_to_c(spec: torch.Tensor, block_size: int) -> torch.Tensor:
    """Inverse of `spectra`: (F, q, p) complex -> c[p, q, b] real."""
    return torch.fft.irfft(spec.permute(2, 1, 0), n=block_size, dim=-1)


def block_spectra(x: torch.Tensor, in_features: int, block_size: int) -> torch.Tensor:
    """Input rows (N, in) -> spectra of their blocks, frequency-major (F, N, q)."""
    q = math.ceil(in_features / block_size)
    x = torch.nn.functional.pad(x, (0, q * block_size - in_features))
    return torch.fft.rfft(x.reshape(x.shape[0], q, block_size), dim=-1).permute(2, 0, 1)


def circulant_matmul(x: torch.Tensor, spec: torch.Tensor, out_features: int, in_features: int,
                     block_size: int) -> torch.Tensor:
    """y = x @ W.T for the block-circulant W with frequency-major spectra `spec` (F, q, p).

    x: (N, in) float32. Returns (N, out) float32.
    """
    x_hat = block_spectra(x, in_features, block_size)          # (F, N, q)
    y_hat = torch.bmm(x_hat, spec)                             # (F, N, p)
    y = torch.fft.irfft(y_hat.permute(1, 2, 0), n=block_size, dim=-1)  # (N, p, b)
    return y.reshape(x.shape[0], -1)[:, :out_features]
