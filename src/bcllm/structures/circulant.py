"""Block-circulant: BlockCirculantLinear (c[p, q, b], docs/DESIGN.md section 1, the product in the
frequency domain), its config CirculantConfig, and the fused gated MLP FusedCirculantMLP.

The spectra are a cache derived from c (ops.circulant_math.cached_spectra): rebuilt only when c changes
(its version counter moves) and, under autograd, computed in the forward pass so that gradients
flow to c. gate_proj and up_proj of a gated MLP (Llama, Qwen2, Mistral, Gemma style) read the
same input, so once both are BlockCirculantLinear with the same block size they can share one
rfft, one batched matmul over the concatenated spectra and one inverse transform
(`fuse_circulant_mlp_`; docs/DESIGN.md section 4):

    model, tok = load_model("smollm2-135m")
    compress_(model, CirculantConfig(block_size=16, targets="mlp"))
    fuse_circulant_mlp_(model)        # same outputs, fewer kernel launches per token

The fused module works under autograd as well as in eval: the state dict keeps the unfused names
(mlp.gate_proj.c, ...), so checkpoints load either way.

spectra_bits=8 stores the spectra as int8 codes with a float32 scale per frequency and output
block (ops.circulant.quantize_spectra): the module computes with the rounded spectra on every path
(the fused decode kernel reads the codes, a quarter of the bytes; the torch path their dequantised
values; under autograd the straight-through estimate). A saved folder holds c on that grid
(`rounded_c`: the inverse of the rounded spectra, which round to the same codes) and `export_model`
bakes it in place (`bake_spectra_`), so a folder or an export computes the same function from c alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from ..errors import InputError
from ..ops import circulant
from ..ops.costs import circulant_costs
from ..surgery import set_module
from .base import StructureConfig, StructuredLinear, check_block_size, factory, linear_weight, register


class BlockCirculantLinear(StructuredLinear):
    def __init__(self, in_features: int, out_features: int, block_size: int, bias: bool = True,
                 device=None, dtype=None, spectra_bits: int = 32):
        super().__init__(in_features, out_features, bias, device, dtype)
        check_block_size(block_size, out_features, in_features)
        self.block_size, self.spectra_bits = block_size, check_spectra_bits(spectra_bits)
        p, q = circulant.grid_shape(out_features, in_features, block_size)
        # Initialised like nn.Linear: each output sums in_features products.
        self.c = nn.Parameter(torch.empty(p, q, block_size, **factory(device, dtype)).uniform_(-1, 1) / in_features ** 0.5)
        self._spectra = self._spectra_key = None  # the spectra cache (circulant.cached_spectra)
        self._quantized = None  # spectra_bits 8: the rounded spectra's cache (circulant.quantized_spectra)

    @classmethod
    def from_linear(cls, linear: nn.Module, block_size: int, spectra_bits: int = 32) -> "BlockCirculantLinear":
        """Frobenius projection of a dense layer (nn.Linear or Conv1D)."""
        layer = cls(block_size=block_size, spectra_bits=spectra_bits, **cls.dense_args(linear))
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
        """The (out, in) matrix the module multiplies by (with spectra_bits 8: of the rounded spectra)."""
        c = self.c if self.spectra_bits == 32 else rounded_c(self.c)
        return circulant.to_dense(c, self.out_features, self.in_features)

    def spectra(self) -> torch.Tensor:
        """Planar frequency-major (2, F, q, p) spectra; cached unless gradients must flow to c
        (ops.circulant_math.cached_spectra)."""
        # (self._parameters["c"], not self.c: nn.Module's lookup costs ~0.6 us, and this runs per decode call)
        return circulant.cached_spectra(self, self._parameters["c"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise InputError(f"expected input with last dimension {self.in_features}, got {tuple(x.shape)}")
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)  # (no-op views cost microseconds at decode)
        spectra, quantized = ((self.spectra(), None) if self.spectra_bits == 32
                              else circulant.quantized_spectra(self, self._parameters["c"]))
        y = self.add_bias(circulant.circulant_matmul(rows, spectra, self.out_features, self.in_features,
                                                     self.block_size, quantized))
        if x.dim() != 2:
            y = y.reshape(*x.shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def costs(self) -> dict:
        """Per token, as ops.costs.circulant_costs counts them (the cached spectra are what is read)."""
        return circulant_costs(self.out_features, self.in_features, self.block_size, self.bias is not None,
                               self.c.element_size(), spectra_bits=self.spectra_bits)

    def sizes(self) -> dict:
        return {"block_size": self.block_size}

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", spectra_bits={self.spectra_bits}" if self.spectra_bits != 32 else "")


def check_spectra_bits(bits) -> int:
    if bits not in circulant.SPECTRA_BITS:
        raise InputError(f"spectra_bits must be one of {', '.join(map(str, circulant.SPECTRA_BITS))} (float32 or "
                         f"int8 spectra), got {bits!r}", "spectra_bits")
    return bits


def rounded_c(c: torch.Tensor) -> torch.Tensor:
    """The c whose spectra are those of `c` rounded to int8 (quantize_spectra): it rounds to the same codes."""
    codes, scales = circulant.quantize_spectra(circulant.spectra(c))
    return circulant.spectra_to_c(circulant.dequantize_spectra(codes, scales), c.shape[-1]).to(c.dtype)


def set_spectra_bits_(model: nn.Module, bits: int) -> list[str]:
    """Store the spectra of every BlockCirculantLinear of `model` in `bits` (SPECTRA_BITS) from now on
    (8: round a fitted student's spectra to int8 after the fact); returns the modules' names."""
    check_spectra_bits(bits)
    names = [n for n, m in model.named_modules() if isinstance(m, BlockCirculantLinear)]
    if not names:
        raise InputError("spectra_bits applies to block-circulant modules; this model has none", "spectra_bits")
    for name in names:
        model.get_submodule(name).spectra_bits = bits
    return names


def int8_spectra_modules(model: nn.Module) -> list[str]:
    """Names of the BlockCirculantLinear modules of `model` whose spectra are int8."""
    return [n for n, m in model.named_modules() if isinstance(m, BlockCirculantLinear) and m.spectra_bits != 32]


@torch.no_grad()
def bake_spectra_(model: nn.Module) -> list[str]:
    """Put c of every BlockCirculantLinear with int8 spectra on its grid (c = rounded_c(c)): the same
    function, now also computed by code that knows only c (a saved folder, an export). Returns the
    changed modules' names."""
    names = int8_spectra_modules(model)
    for name in names:
        module = model.get_submodule(name)
        module.c.copy_(rounded_c(module.c))
    return names

@register("circulant")
@dataclass
class CirculantConfig(StructureConfig):
    """Which linear layers become block-circulant, and with which block size.

    block_size: default block size b.
    targets: module-name suffixes, globs over full names, or shorthands 'mlp' / 'attn'.
    layers: decoder-layer indices ('all', '10-19', '0,3,5', or a list); None = all.
    block_sizes: per-module overrides {suffix or glob: block size}; first match wins.
    """

    block_size: int = 16
    targets: Sequence[str] | str = ("mlp",)
    layers: Iterable[int] | str | None = None
    block_sizes: dict[str, int] = field(default_factory=dict)
    spectra_bits: int = 32  # 32: float32 spectra; 8: int8 codes with a scale per frequency and output block
    module = BlockCirculantLinear

    @classmethod
    def from_options(cls, size, rank, **where):
        return cls(block_size=size, **where)

    def block_size_for(self, name: str) -> int:
        return self.size_override(name) or self.block_size

    def size_for(self, name, out_features, in_features):
        return {"block_size": check_block_size(self.block_size_for(name), out_features, in_features),
                "spectra_bits": check_spectra_bits(self.spectra_bits)}



class FusedCirculantMLP(nn.Module):
    """down_proj(act_fn(gate_proj(x)) * up_proj(x)) with gate and up in one circulant product."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        self._spectra = self._spectra_key = None  # the spectra cache (circulant.cached_spectra)
        self._quantized = None  # int8 spectra: their cache (circulant.quantized_spectra)

    def spectra(self) -> torch.Tensor:
        """(2, F, q, p_gate + p_up) spectra of gate and up side by side; cached as in BlockCirculantLinear."""
        return circulant.cached_spectra(self, self.gate_proj.c, self.up_proj.c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj, self.up_proj
        if x.shape[-1] != gate.in_features:
            raise InputError(f"expected input with last dimension {gate.in_features}, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        up_start = gate.c.shape[0] * gate.block_size  # gate's padded rows come first
        rows, out_features = x.reshape(-1, gate.in_features).float(), up_start + up.out_features
        # (int8: scales per output block, so gate's and up's side by side are those of the concatenation)
        spectra, quantized = ((self.spectra(), None) if gate.spectra_bits == 32
                              else circulant.quantized_spectra(self, gate.c, up.c))
        y = circulant.circulant_matmul(rows, spectra, out_features, gate.in_features, gate.block_size, quantized)
        g, u = y[:, :gate.out_features], y[:, up_start:]
        if gate.bias is not None:
            g = g + gate.bias.float()
        if up.bias is not None:
            u = u + up.bias.float()
        # Cast before the activation, as the unfused layers would, so 16-bit models match too.
        h = self.act_fn(g.to(x.dtype)) * u.to(x.dtype)
        return self.down_proj(h.reshape(*lead, gate.out_features))


def fusable(mlp: nn.Module) -> bool:
    gate, up = getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)
    return (isinstance(gate, BlockCirculantLinear) and isinstance(up, BlockCirculantLinear)
            and gate.block_size == up.block_size and gate.in_features == up.in_features
            and gate.spectra_bits == up.spectra_bits
            and gate.out_features == up.out_features
            and hasattr(mlp, "down_proj") and hasattr(mlp, "act_fn"))


def fuse_circulant_mlp_(model: nn.Module) -> list[str]:
    """Replace, in place, every gated MLP whose gate_proj and up_proj are BlockCirculantLinear
    with equal block size by a FusedCirculantMLP. Returns the names of the fused MLPs."""
    names = [n for n, m in model.named_modules() if not isinstance(m, FusedCirculantMLP) and fusable(m)]
    for name in names:
        set_module(model, name, FusedCirculantMLP(model.get_submodule(name)))
    return names
