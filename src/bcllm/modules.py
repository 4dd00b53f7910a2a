"""Drop-in nn.Linear replacements with structured weights.

StructuredLinear is the small base every structured module shares (shape, optional bias,
parameter count, the sizes that describe it). BlockCirculantLinear stores c[p, q, b] (docs/DESIGN.md section 1) and runs the
product in the frequency domain. The spectra are a cache derived from c: rebuilt
only when c changes (its version counter moves) and, under autograd, computed in
the forward pass so that gradients flow to c.
"""

from __future__ import annotations

import torch
from torch import nn

from . import circulant
from .errors import InputError


def check_block_size(block_size, out_features: int, in_features: int) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise InputError(f"block_size must be an int, got {block_size!r}", "block_size")
    if block_size < 1:
        raise InputError(f"block_size must be >= 1, got {block_size}", "block_size")
    if block_size > min(out_features, in_features):
        raise InputError(
            f"block_size {block_size} is larger than the layer's smaller dimension "
            f"({out_features}x{in_features}); allowed: 1..{min(out_features, in_features)}", "block_size")
    return block_size


def linear_weight(module: nn.Module) -> torch.Tensor:
    """Weight of an nn.Linear or GPT-2 style Conv1D as (out, in)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D stores (in, out)
        return module.weight.t()
    raise InputError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")


def factory(device=None, dtype=None) -> dict:
    """Tensor-factory keywords of a new module's parameters: float32 unless a dtype is given."""
    return dict(device=device, dtype=dtype or torch.float32)


class StructuredLinear(nn.Module):
    """Base of the structured replacements for nn.Linear: in/out features and an optional bias
    (float32 unless a dtype is given). A subclass adds its weights, `from_linear` (plain fit to W),
    `fit_(weight, stats, ridge)` (activation-aware fit), `to_dense()`, `forward`, `sizes()` and
    `costs()` (FLOPs, weight bytes, parameters per token, as bcllm.costs counts them)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features, **factory(device, dtype))) if bias else None

    @staticmethod
    def dense_args(linear: nn.Module) -> dict:
        """Constructor arguments (shape, bias, device, dtype) of a replacement for `linear`."""
        weight = linear_weight(linear)
        return dict(in_features=weight.shape[1], out_features=weight.shape[0],
                    bias=getattr(linear, "bias", None) is not None, device=weight.device, dtype=weight.dtype)

    @torch.no_grad()
    def copy_bias_(self, linear: nn.Module) -> None:
        if self.bias is not None:
            self.bias.copy_(linear.bias)

    def add_bias(self, y: torch.Tensor) -> torch.Tensor:
        bias = self._parameters.get("bias")  # (not self.bias: nn.Module's lookup costs ~0.6 us a decode call)
        return y if bias is None else y + bias.to(y.dtype)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def sizes(self) -> dict:
        """What sizes this module (e.g. {"block_size": 16}); reported per module by compress_."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}"]
        parts += [f"{k}={v}" for k, v in self.sizes().items()] + [f"bias={self.bias is not None}"]
        return ", ".join(parts)


class BlockCirculantLinear(StructuredLinear):
    def __init__(self, in_features: int, out_features: int, block_size: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        check_block_size(block_size, out_features, in_features)
        self.block_size = block_size
        p, q = circulant.grid_shape(out_features, in_features, block_size)
        # Initialised like nn.Linear: each output sums in_features products.
        self.c = nn.Parameter(torch.empty(p, q, block_size, **factory(device, dtype)).uniform_(-1, 1) / in_features ** 0.5)
        self._spec = None
        self._spec_key = None

    @classmethod
    def from_linear(cls, linear: nn.Module, block_size: int) -> "BlockCirculantLinear":
        """Frobenius projection of a dense layer (nn.Linear or Conv1D)."""
        layer = cls(block_size=block_size, **cls.dense_args(linear))
        with torch.no_grad():
            layer.c.copy_(circulant.project_frobenius(linear_weight(linear), block_size))
        layer.copy_bias_(linear)
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
        """Planar frequency-major (2, F, q, p) spectra; cached unless gradients must flow to c."""
        c = self._parameters["c"]  # (not self.c: nn.Module's lookup costs ~0.6 us, and this runs per decode call)
        if torch.compiler.is_compiling() and self._spec is not None:
            return self._spec  # a captured graph holds the cache as it was (bench.lean_decode builds it first)
        if torch.is_grad_enabled() and c.requires_grad:
            return circulant.spectra(c)
        key = (c._version, c.data_ptr())  # (a move to another device changes the pointer)
        if self._spec_key != key:
            with torch.inference_mode(False), torch.no_grad():
                self._spec = circulant.spectra(c)
            self._spec_key = key
        return self._spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise InputError(f"expected input with last dimension {self.in_features}, got {tuple(x.shape)}")
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)  # (no-op views cost microseconds at decode)
        y = self.add_bias(circulant.circulant_matmul(rows, self.spectra(), self.out_features, self.in_features,
                                                     self.block_size))
        if x.dim() != 2:
            y = y.reshape(*x.shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def sizes(self) -> dict:
        return {"block_size": self.block_size}
