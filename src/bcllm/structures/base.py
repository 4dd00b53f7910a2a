"""Structures: what replaces a dense nn.Linear, registered once by name.

A structure is a config dataclass (data only: sizes, `targets`, `layers`) registered with
`@register("name")`, and a module (a modules.StructuredLinear) with `from_linear` (plain fit to W),
`fit_(weight, stats, ridge)` (activation-aware fit), `to_dense()`, `sizes()` and `costs()`.
The registry `STRUCTURES` is what the CLI's --structure choices, pipeline.config_for, checkpoint
loading and the budget sizing read, so adding a structure touches one file (see the test with a
diagonal structure). `compress_(model, config)` works the same for every one of them.

Every activation-aware fit minimises the objective of stats.InputStats, ridge included:

    f(W_hat) = tr(W_hat A W_hat^T) - 2 <W_hat, K>,   A = xx + lam I,  K = W xt^T,
    lam = ridge * mean(diag xx)       (the ridge adds lam ||W_hat||_F^2 to the data term)

so its unconstrained optimum is W* = K A^-1 and, with A = L L^T, f = ||W_hat L - K L^-T||_F^2 + const.

Budgets: `budget_block_size=B` sizes each module to the parameter count of a block-circulant
of block size B on the same shape (rounded down to what the structure can express).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import nn

from ..errors import InputError
from ..ops import circulant
from ..ops.stats import InputStats
from ..surgery import matches

def check_size(value, name: str, out_features: int, in_features: int) -> int:
    """An integer size (rank, number of blocks) in 1..min(out, in) for an out x in layer."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be an int, got {value!r}", name)
    if not 1 <= value <= min(out_features, in_features):
        raise InputError(f"{name} must be in 1..{min(out_features, in_features)} for a "
                         f"{out_features}x{in_features} layer, got {value}", name)
    return value


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

    def costs(self) -> dict:
        """Per token: FLOPs of a dense product of this shape, bytes and count of the module's own
        parameters (a structure whose product is cheaper overrides it)."""
        return _weight_costs(self, 2 * self.out_features * self.in_features)

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}"]
        parts += [f"{k}={v}" for k, v in self.sizes().items()] + [f"bias={self.bias is not None}"]
        return ", ".join(parts)


def fitted_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of the structured modules of a student: every StructuredLinear,
    except the parts of a composite (the hybrid's circulant and low-rank), which their owner fits."""
    found = {n: m for n, m in model.named_modules() if isinstance(m, StructuredLinear)}
    return {n: m for n, m in found.items() if not any(n.startswith(o + ".") for o in found)}


# ---------------------------------------------------------------- registry

STRUCTURES: dict[str, type] = {}  # name -> config class


def register(name: str):
    """Class decorator: make a config class the structure `name` (CLI, spec, checkpoints)."""
    def add(cls):
        if name in STRUCTURES and STRUCTURES[name] is not cls:
            raise InputError(f"structure {name!r} is already registered ({STRUCTURES[name].__name__})", "structure")
        cls.structure = name
        STRUCTURES[name] = cls
        return cls
    return add


def structure_config(name: str) -> type:
    if name not in STRUCTURES:
        raise InputError(f"unknown structure {name!r}; allowed: {', '.join(STRUCTURES)}", "structure")
    return STRUCTURES[name]


def config_class(type_name: str) -> type:
    """The registered config class with this class name (as a saved student records it)."""
    for cls in STRUCTURES.values():
        if cls.__name__ == type_name:
            return cls
    raise InputError(f"saved config type {type_name!r} is not a structure of this bcllm version; known: "
                     f"{', '.join(c.__name__ for c in STRUCTURES.values())}")


# ---------------------------------------------------------------- objective shared by all fits

def ridged_gram(stats: InputStats, ridge: float) -> torch.Tensor:
    """A = xx + lam I, lam = ridge * mean(diag xx), float64."""
    xx = stats.xx.to(torch.float64)
    lam = ridge * xx.diagonal().mean()
    return xx + lam * torch.eye(xx.shape[0], dtype=xx.dtype, device=xx.device)


def cross(weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
    """K = W xt^T (out, in), float64: the data term is <W_hat, K>."""
    return weight.detach().to(stats.xt.device, torch.float64) @ stats.xt.to(torch.float64).T


def fit_objective(w_hat: torch.Tensor, weight: torch.Tensor, stats: InputStats, ridge: float = 0.0) -> float:
    """tr(W_hat A W_hat^T) - 2 <W_hat, K>: the quantity every fit_ minimises (up to a constant)."""
    a, k = ridged_gram(stats, ridge), cross(weight, stats)
    w_hat = w_hat.detach().to(a.device, torch.float64)
    return float(((w_hat @ a) * w_hat).sum() - 2 * (w_hat * k).sum())


def _cholesky(a: torch.Tensor) -> torch.Tensor:
    chol, info = torch.linalg.cholesky_ex(a)
    if info.any():
        raise InputError("calibration Gram matrix is singular (fewer tokens than inputs?); use ridge > 0", "ridge")
    return chol


def _weight_costs(module: nn.Module, weight_flops: int) -> dict:
    """{flops, bytes, params} per token of a module's own (not its children's) parameters."""
    bias = module.bias
    own = list(module.parameters(recurse=False))
    return {"flops": weight_flops + (bias.numel() if bias is not None else 0),
            "bytes": sum(p.numel() * p.element_size() for p in own), "params": sum(p.numel() for p in own)}


# ---------------------------------------------------------------- budgets

def circulant_params(out_features: int, in_features: int, block_size: int) -> int:
    """Weights of a block-circulant of block size b on this shape (padding included, as stored)."""
    p, q = circulant.grid_shape(out_features, in_features, block_size)
    return p * q * block_size



def _too_small(out_features, in_features, budget_block_size, what):
    return InputError(f"the budget of circulant block size {budget_block_size} "
                      f"({circulant_params(out_features, in_features, budget_block_size):,} weights for "
                      f"{out_features}x{in_features}) is too small for {what}; use a smaller budget block size",
                      "budget_block_size")


def _one_of(structure: str, **sizes) -> None:
    given = [k for k, v in sizes.items() if v is not None]
    if len(given) != 1:
        raise InputError(f"{structure}: give exactly one of {' or '.join(sizes)}, got "
                         f"{', '.join(given) if given else 'neither'}", list(sizes)[0])



# ---------------------------------------------------------------- configs

class StructureConfig:
    """What every registered config shares. A subclass is a dataclass with its size fields plus
    `targets` and `layers` (as surgery.select_modules reads them), a `module` class, and
    `size_for(name, out_features, in_features) -> dict` (the module's constructor sizes; raises
    InputError when this shape cannot take them). Configs hold data only: what was built per
    module is in compress_'s summary."""

    module: type = None
    takes_rank = False  # whether --rank / pipeline's `rank` option applies
    budget_block_size = None

    @classmethod
    def from_options(cls, size: int, rank: int | None, **where) -> "StructureConfig":
        """The config of the generic size options: circulant block size (or budget) `size`,
        `rank` (structures with takes_rank)."""
        raise NotImplementedError

    def size_for(self, name: str, out_features: int, in_features: int) -> dict:
        raise NotImplementedError

    def check(self, name: str, linear: nn.Module) -> dict:
        out_features, in_features = linear_weight(linear).shape
        try:
            return self.size_for(name, out_features, in_features)
        except InputError as e:
            raise InputError(f"{name}: {e}", e.param) from None

    def build(self, name: str, linear: nn.Module) -> nn.Module:
        return self.module.from_linear(linear, **self.check(name, linear))

    def size_override(self, name: str) -> int | None:
        """The block size (circulant) or budget block size (the others) that the config's
        `block_sizes` map {suffix or glob: size} gives module `name`; first match wins."""
        for pattern, b in (getattr(self, "block_sizes", None) or {}).items():
            if matches(name, pattern):
                return b
        return None

    def budget_weights(self, out_features: int, in_features: int, name: str = "") -> int:
        """Weights of the circulant of block size budget_block_size (or the module's own budget
        in block_sizes) on this shape: the budget."""
        b = self.size_override(name) or self.budget_block_size
        return circulant_params(out_features, in_features, check_block_size(b, out_features, in_features))

    def budget_params(self, linear: nn.Module, name: str = "") -> int | None:
        """Parameter count (bias included) of the circulant budget this module is cut from, or None."""
        if self.budget_block_size is None:
            return None
        out_features, in_features = linear_weight(linear).shape
        bias = linear.bias.numel() if getattr(linear, "bias", None) is not None else 0
        return self.budget_weights(out_features, in_features, name) + bias

    def describe(self) -> dict:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("targets", "layers")}
        return {"structure": self.structure, **fields}


def budget_report(model: nn.Module, modules: Sequence[str], budget_block_size: int) -> dict:
    """Parameters of the replaced `modules` (as compressed now) beside a block-circulant of block
    size `budget_block_size` on the same shapes (biases counted on both sides)."""
    actual = budget = 0
    for name in modules:
        m = model.get_submodule(name)
        bias = m.bias.numel() if getattr(m, "bias", None) is not None else 0
        actual += sum(p.numel() for p in m.parameters())
        budget += circulant_params(m.out_features, m.in_features, budget_block_size) + bias
    return {"budget_block_size": budget_block_size, "budget_params": budget, "actual_params": actual,
            "fraction_of_budget": actual / max(budget, 1)}
