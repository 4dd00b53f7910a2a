"""Drop-in nn.Linear replacements with structured weights.

BlockCirculantLinear stores c[p, q, b] (docs/DESIGN.md section 1) and runs the
product in the frequency domain. The spectra are a cache derived from c: rebuilt
only when c changes (its version counter moves) and, under autograd, computed in
the forward pass so that gradients flow to c.
"""

from __future__ import annotations

import torch
from torch import nn

from . import circulant


def check_block_size(block_size, out_features: int, in_features: int) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, got {block_size!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if block_size > min(out_features, in_features):
        raise ValueError(
            f"block_size {block_size} is larger than the layer's smaller dimension "
            f"({out_features}x{in_features}); allowed: 1..{min(out_features, in_features)}")
    return block_size


def linear_weight(module: nn.Module) -> torch.Tensor:
    """Weight of an nn.Linear or GPT-2 style Conv1D as (out, in)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D stores (in, out)
        return module.weight.t()
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")


class BlockCirculantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, block_size: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        check_block_size(block_size, out_features, in_features)
        self.in_features, self.out_features, self.block_size = in_features, out_features, block_size
        p, q = circulant.grid_shape(out_features, in_features, block_size)
        kw = dict(device=device, dtype=dtype or torch.float32)
        # Initialised like nn.Linear: each output sums in_features products.
        self.c = nn.Parameter(torch.empty(p, q, block_size, **kw).uniform_(-1, 1) / in_features ** 0.5)
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self._spec = None
        self._spec_key = None

    @classmethod
    def from_linear(cls, linear: nn.Module, block_size: int) -> "BlockCirculantLinear":
        """Frobenius projection of a dense layer (nn.Linear or Conv1D)."""
        weight = linear_weight(linear)
        out_features, in_features = weight.shape
        bias = getattr(linear, "bias", None)
        layer = cls(in_features, out_features, block_size, bias=bias is not None,
                    device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.c.copy_(circulant.project_frobenius(weight, block_size))
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @torch.no_grad()
    def fit_(self, weight: torch.Tensor, stats, ridge: float = 1e-4) -> "BlockCirculantLinear":
        """Activation-aware fit to the original dense (out, in) weight from calibration
        InputStats (bcllm.calibrate); the bias stays the original one."""
        self.c.copy_(circulant.fit_aware(weight, stats.xx, stats.xt, self.block_size, ridge))
        return self

    def to_dense(self) -> torch.Tensor:
        return circulant.to_dense(self.c, self.out_features, self.in_features)

    def spectra(self) -> torch.Tensor:
        """Frequency-major (F, q, p) spectra; cached unless gradients must flow to c."""
        if torch.is_grad_enabled() and self.c.requires_grad:
            return circulant.spectra(self.c)
        key = (self.c._version, self.c.data_ptr(), self.c.device)
        if self._spec_key != key:
            with torch.inference_mode(False), torch.no_grad():
                self._spec = circulant.spectra(self.c)
            self._spec_key = key
        return self._spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with last dimension {self.in_features}, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        y = circulant.circulant_matmul(x.reshape(-1, self.in_features).float(), self.spectra(),
                                       self.out_features, self.in_features, self.block_size)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.reshape(*lead, self.out_features).to(x.dtype)

    @property
    def num_params(self) -> int:
        return self.c.numel() + (self.bias.numel() if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block_size={self.block_size}, bias={self.bias is not None}")
