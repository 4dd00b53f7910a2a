"""The baselines a user would pick instead of a structure: weight quantization (QuantizedLinear,
QuantConfig) and pruning (PrunedLinear, PruneConfig), through the same fits, evaluation and floor.

Quantization: b-bit codes with an asymmetric scale and zero point per group of `group_size` inputs
(per output row when group_size is None), as llama.cpp's and GPTQ's formats store them. from_linear
rounds to nearest (RTN); `fit_` is GPTQ (Frantar et al. 2022): columns quantised in order, each
one's error spread over the columns not yet quantised through the inverse Gram of the calibration
inputs, which minimises the same objective as every activation-aware fit here. Scales and zero
points are parameters (block reconstruction and distillation train them; the codes stay fixed).

Pruning: a fixed mask over the dense weight. from_linear keeps the largest |W|; `fit_` is Wanda
(Sun et al. 2023): scores |W| * ||x|| per input (the calibration inputs' norms), compared within
each output row; `pattern` "unstructured" keeps 1 - sparsity of each row, "2:4" two of every
four consecutive inputs. The kept weights train; the pruned ones stay zero.

Bytes (costs), with float data at its stored width like every structure's: codes at `bits` each
plus a scale and zero point per group; the pruned weight as its kept values plus a 1-bit mask
(unstructured) or 2:4's 2 bits per kept value.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from ..errors import InputError
from .base import InputStats, StructureConfig, StructuredLinear, _cholesky, factory, linear_weight, ridged_gram, register


def check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise InputError(f"bits must be an int in 2..8, got {bits!r}", "bits")
    return bits


def quant_grid(w: torch.Tensor, bits: int, zero_point: str = "float") -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of an asymmetric b-bit grid over the last dimension; code q stands for
    (q - zero) * scale. zero_point "float": the grid runs from the min to the max, zero = -min /
    scale unrounded, as llama.cpp's Q4_1 and torchao's asymmetric int4 store it. "int": GPTQ's
    grid, widened to hold 0 and zero rounded to an integer code, so 0 is exactly representable
    (at 2 bits that is worth much more than the finer grid: docs/results.md)."""
    lo, hi = w.amin(-1), w.amax(-1)
    if zero_point == "int":
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / (2 ** bits - 1)).clamp(min=1e-12)
    zero = -lo / scale
    return scale, torch.round(zero) if zero_point == "int" else zero


ZERO_POINTS = ("float", "int")


def check_zero_point(zero_point) -> str:
    if zero_point not in ZERO_POINTS:
        raise InputError(f"zero_point must be one of {', '.join(ZERO_POINTS)}, got {zero_point!r}", "zero_point")
    return zero_point


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of w on the grid (scale, zero broadcast over w's last dimension)."""
    return torch.clamp(torch.round(w / scale[..., None] + zero[..., None]), 0, 2 ** bits - 1)


# Rows up to which 8-bit per-row layers multiply with PyTorch's int8 kernel (decode); above, the
# dequantised matmul (prefill and fitting), as the circulant decode kernel (ops.circulant.KERNEL_MAX_ROWS).
DECODE_MAX_ROWS = 4


def int8_pack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple:
    """The 8-bit per-row grid in the form of torch._weight_int8pack_mm (signed codes, a bfloat16
    scale per row) plus two float32 rows: W = (codes - zero) scale = (c - z) scale with c = codes -
    128 in int8 and z = zero - 128, so x W^T = int8pack(x, c, s16) (scale / s16) - (sum x) (z scale),
    where s16 is the scale rounded to bfloat16 (the kernel's) and scale / s16 undoes that rounding."""
    signed = (codes.to(torch.int16) - 128).to(torch.int8)
    s16 = scale.to(torch.bfloat16)
    s16 = torch.where(s16 == 0, torch.ones_like(s16), s16)  # (a scale that underflows: 0 / 0 would be NaN)
    return signed, s16, (scale / s16.float()).float(), ((zero - 128) * scale).float()


def int8_rows_product(x: torch.Tensor, signed: torch.Tensor, s16: torch.Tensor, correction: torch.Tensor,
                      offset: torch.Tensor) -> torch.Tensor:
    """x (codes - zero)^T scale for a few rows through PyTorch's int8 weight-only kernel, with the
    activations in bfloat16: its CPU kernel vectorises that case only (float32 activations measured
    9-13x slower than a float32 dense product here, bfloat16 ones about 2x faster), as gpt-fast's
    int8 runs. So decode computes with activations and the kernel's output rounded to bfloat16
    (relative 2^-9 each), unlike the float path of longer inputs; the result is float32. The kernel
    reads the activations with aligned vector loads and no tail loop: they are passed contiguous,
    64-byte aligned, and in_features must be a multiple of 32 (int8_decode_fits)."""
    # float32 rows: a fresh copy, which the allocator aligns; bfloat16 rows may be a misaligned view.
    # (No data_ptr test: it would break torch.compile's graph at every layer.)
    a = x.clone(memory_format=torch.contiguous_format) if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)
    y = torch._weight_int8pack_mm(a.contiguous(), signed, s16).float() * correction
    return y - x.float().sum(-1, keepdim=True) * offset


def int8_decode_fits(in_features: int) -> bool:
    """Whether PyTorch's int8 kernel takes rows of this length: its vector loop steps over the inputs
    in 8s (AVX2, NEON) or 16s (AVX-512) with no tail (other lengths read out of bounds: NaN or a
    crash, measured), so a multiple of 32."""
    return in_features % 32 == 0


@functools.lru_cache(maxsize=None)
def int8_kernel_available() -> bool:
    """Whether this torch build has the CPU int8 weight-only kernel."""
    try:
        torch._weight_int8pack_mm(torch.ones(1, 32, dtype=torch.bfloat16), torch.ones(8, 32, dtype=torch.int8),
                                  torch.ones(8, dtype=torch.bfloat16))
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


class QuantizedLinear(StructuredLinear):
    """W_hat[:, group g] = (codes - zero[:, g]) * scale[:, g]; codes in 0 .. 2^bits - 1."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None = None,
                 zero_point: str = "float", damp: float = 0.0, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.bits, self.group_size = check_bits(bits), group_size or in_features
        self.zero_point, self.damp = check_zero_point(zero_point), float(damp)
        if in_features % self.group_size:
            raise InputError(f"group_size {self.group_size} does not divide the {in_features} inputs", "group_size")
        groups = in_features // self.group_size
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.uint8, device=device))
        self.scale = nn.Parameter(torch.ones(out_features, groups, **factory(device, dtype)))
        self.zero = nn.Parameter(torch.zeros(out_features, groups, **factory(device, dtype)))

    def _grouped(self, w: torch.Tensor) -> torch.Tensor:
        return w.reshape(self.out_features, -1, self.group_size)

    @torch.no_grad()
    def _set(self, w: torch.Tensor) -> None:
        """Round-to-nearest codes of w (out, in) on per-group min..max grids."""
        scale, zero = quant_grid(self._grouped(w), self.bits, self.zero_point)
        self.scale.copy_(scale)
        self.zero.copy_(zero)
        self.codes.copy_(quantize(self._grouped(w), scale, zero, self.bits).reshape_as(w))

    @classmethod
    def from_linear(cls, linear: nn.Module, bits: int, group_size: int | None = None, zero_point: str = "float",
                    damp: float = 0.0) -> "QuantizedLinear":
        layer = cls(bits=bits, group_size=group_size, zero_point=zero_point, damp=damp, **cls.dense_args(linear))
        layer._set(linear_weight(linear).detach().float())
        layer.copy_bias_(linear)
        return layer

    @torch.no_grad()
    def fit_(self, weight: torch.Tensor, stats: InputStats, ridge: float = 1e-4) -> "QuantizedLinear":
        """GPTQ on the ridged Gram A: quantise column j, then move its error, scaled by the rows of
        the upper Cholesky factor of A^-1, onto the columns after it (each group's grid is set from
        the updated weights when its first column comes up). The damping is the larger of the fit's
        ridge and the layer's own `damp` (GPTQ's default is 0.01 of the mean Gram diagonal: with
        bcllm's least-squares ridge, 1e-4, GPTQ overfits the calibration statistics at 2-3 bits)."""
        w = weight.detach().to(torch.float64).clone()
        damped = ridged_gram(stats, max(ridge, self.damp)).to(w.device)
        u = torch.linalg.cholesky(torch.cholesky_inverse(_cholesky(damped)), upper=True)
        scale, zero = torch.empty_like(self.scale, dtype=w.dtype), torch.empty_like(self.zero, dtype=w.dtype)
        codes = torch.empty_like(w)
        for j in range(self.in_features):
            g = j // self.group_size
            if j % self.group_size == 0:
                scale[:, g], zero[:, g] = quant_grid(w[:, j:j + self.group_size], self.bits, self.zero_point)
            codes[:, j] = quantize(w[:, j:j + 1], scale[:, g], zero[:, g], self.bits)[:, 0]
            err = (w[:, j] - (codes[:, j] - zero[:, g]) * scale[:, g]) / u[j, j]
            w[:, j + 1:] -= err[:, None] * u[j, j + 1:][None, :]
        self.scale.copy_(scale)
        self.zero.copy_(zero)
        self.codes.copy_(codes)
        return self

    def to_dense(self) -> torch.Tensor:
        w = (self._grouped(self.codes.to(self.scale.dtype)) - self.zero[..., None]) * self.scale[..., None]
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= DECODE_MAX_ROWS and self._int8_decode(x):
            return self.add_bias(int8_rows_product(rows, *self._packed).to(x.dtype)).reshape(*x.shape[:-1], -1)
        return self.add_bias(nn.functional.linear(x, self.to_dense().to(x.dtype)))

    def _int8_decode(self, x: torch.Tensor) -> bool:
        """Whether the few-rows path runs PyTorch's int8 kernel (int8_rows_product): 8 bits, one grid per
        output row, inputs in 32s, a CPU, no gradient (the kernel has no derivative); packs (int8_pack)
        once per change of the codes or grid (version counters; the pack as it is while torch.compile
        captures a graph)."""
        if torch.is_grad_enabled() and (x.requires_grad or self.scale.requires_grad or self.zero.requires_grad):
            return False
        if torch.compiler.is_compiling() and getattr(self, "_packed", None) is not None:
            return True
        if self.bits != 8 or self.group_size != self.in_features or self.codes.device.type != "cpu" \
                or x.device.type != "cpu" or not int8_decode_fits(self.in_features) or not int8_kernel_available():
            return False
        key = tuple((t._version, t.data_ptr()) for t in (self.codes, self.scale, self.zero))
        if getattr(self, "_packed_key", None) != key:
            with torch.inference_mode(False), torch.no_grad():
                self._packed = int8_pack(self.codes, self.scale[:, 0].float(), self.zero[:, 0].float())
            self._packed_key = key
        return True

    def __getstate__(self):
        """Copies (deepcopy, pickling) leave the int8 pack behind: it is rebuilt on first use."""
        state = dict(super().__getstate__())
        state.pop("_packed", None)
        state.pop("_packed_key", None)
        return state

    @property
    def num_params(self) -> int:
        """Weights (codes) plus scales and zero points and bias: quantization keeps every weight."""
        return self.codes.numel() + sum(p.numel() for p in self.parameters())

    def costs(self) -> dict:
        n, groups = self.codes.numel(), self.scale.numel()
        bias = self.bias.numel() if self.bias is not None else 0
        size = self.scale.element_size()
        return {"flops": 2 * n + bias, "bytes": n * self.bits / 8 + size * (2 * groups + bias),
                "params": n + 2 * groups + bias}

    def sizes(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "zero_point": self.zero_point, "damp": self.damp}


class PrunedLinear(StructuredLinear):
    """W_hat = W * mask: a fixed 0/1 mask; the kept weights train."""

    def __init__(self, in_features: int, out_features: int, sparsity: float = 0.5, pattern: str = "unstructured",
                 bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        if pattern not in ("unstructured", "2:4"):
            raise InputError(f"unknown pruning pattern {pattern!r}; allowed: unstructured, 2:4", "pattern")
        if pattern == "2:4" and in_features % 4:
            raise InputError(f"2:4 pruning needs inputs in fours; this layer has {in_features}", "pattern")
        if not 0 < sparsity < 1:
            raise InputError(f"sparsity must be in (0, 1), got {sparsity}", "sparsity")
        self.sparsity, self.pattern = (0.5, pattern) if pattern == "2:4" else (sparsity, pattern)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, **factory(device, dtype)))
        self.register_buffer("mask", torch.ones(out_features, in_features, dtype=torch.bool, device=device))

    @torch.no_grad()
    def _keep(self, w: torch.Tensor, score: torch.Tensor) -> None:
        """Keep the highest-scoring weights of each output row (2:4: of each group of four inputs)."""
        if self.pattern == "2:4":
            groups = score.reshape(self.out_features, -1, 4)
            mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, -1).indices, True)
        else:
            keep = self.in_features - int(round(self.sparsity * self.in_features))
            mask = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, score.topk(keep, -1).indices, True)
        self.mask.copy_(mask.reshape_as(w))
        self.weight.copy_(w * self.mask)

    @classmethod
    def from_linear(cls, linear: nn.Module, sparsity: float = 0.5, pattern: str = "unstructured") -> "PrunedLinear":
        layer = cls(sparsity=sparsity, pattern=pattern, **cls.dense_args(linear))
        w = linear_weight(linear).detach().float()
        layer._keep(w, w.abs())  # magnitude pruning
        layer.copy_bias_(linear)
        return layer

    @torch.no_grad()
    def fit_(self, weight: torch.Tensor, stats: InputStats, ridge: float = 1e-4) -> "PrunedLinear":
        """Wanda: score |W_ij| * ||x_j|| (the inputs' root sum of squares); the kept weights unchanged."""
        w = weight.detach().to(self.weight.device, torch.float32)
        norms = stats.xx.diagonal().clamp(min=0).sqrt().to(w.device, torch.float32)
        self._keep(w, w.abs() * norms[None, :])
        return self

    def to_dense(self) -> torch.Tensor:
        return self.weight * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_bias(nn.functional.linear(x, self.to_dense().to(x.dtype)))

    @property
    def num_params(self) -> int:
        """Kept weights plus bias: the pruned ones are not stored."""
        return int(self.mask.sum()) + (self.bias.numel() if self.bias is not None else 0)

    def costs(self) -> dict:
        kept, n = int(self.mask.sum()), self.mask.numel()
        bias = self.bias.numel() if self.bias is not None else 0
        index_bits = kept * 2 if self.pattern == "2:4" else n  # 2:4: 2 bits a kept value; else a bitmap
        return {"flops": 2 * kept + bias, "bytes": self.weight.element_size() * (kept + bias) + index_bits / 8,
                "params": kept + bias}

    def sizes(self) -> dict:
        return {"sparsity": self.sparsity, "pattern": self.pattern}


@register("quant")
@dataclass
class QuantConfig(StructureConfig):
    """b-bit weight quantization with a scale and zero point per group of group_size inputs (None:
    per output row), on the min..max grid (zero_point "float") or GPTQ's zero-inside grid ("int");
    damp: GPTQ's damping (fit "sequential"), relative to the mean Gram diagonal. The generic size
    option is the bit width here: `--structure quant --block-size 4`."""

    bits: int = 4
    group_size: int | None = 32
    zero_point: str = "float"
    damp: float = 0.0
    targets: Sequence[str] | str = ("mlp",)
    layers: Iterable[int] | str | None = None
    module = QuantizedLinear

    @classmethod
    def from_options(cls, size, rank, **where):
        return cls(bits=check_bits(size), group_size=None if size == 8 else 32, **where)

    def size_for(self, name, out_features, in_features):
        group = self.group_size or in_features
        if in_features % group:
            raise InputError(f"group_size {group} does not divide the {in_features} inputs", "group_size")
        return {"bits": check_bits(self.bits), "group_size": self.group_size,
                "zero_point": check_zero_point(self.zero_point), "damp": self.damp}


@register("prune")
@dataclass
class PruneConfig(StructureConfig):
    """Pruning to `sparsity` of each row (pattern "unstructured") or 2:4. The generic size option
    picks the pattern: `--structure prune --block-size 2` is 2:4, any other size unstructured 50%."""

    sparsity: float = 0.5
    pattern: str = "unstructured"
    targets: Sequence[str] | str = ("mlp",)
    layers: Iterable[int] | str | None = None
    module = PrunedLinear

    @classmethod
    def from_options(cls, size, rank, **where):
        return cls(pattern="2:4" if size == 2 else "unstructured", **where)

    def size_for(self, name, out_features, in_features):
        if self.pattern == "2:4" and in_features % 4:
            raise InputError(f"{name}: 2:4 pruning needs inputs in fours, got {in_features}", "pattern")
        return {"sparsity": self.sparsity, "pattern": self.pattern}
