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
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from . import circulant
from .costs import layer_costs
from .errors import InputError
from .modules import BlockCirculantLinear, StructuredLinear, check_block_size, factory, linear_weight
from .stats import InputStats
from .surgery import matches

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


# ---------------------------------------------------------------- low rank

def top_svd(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading `rank` singular triplets (u, s, vh) of a float64 matrix, from the eigendecomposition
    of its smaller Gram matrix: a truncation needs only these, and this is several times faster
    than a full SVD (accurate for the kept triplets in float64)."""
    if m.shape[0] < m.shape[1]:
        u, s, vh = top_svd(m.T, rank)
        return vh.T, s, u.T
    evals, evecs = torch.linalg.eigh(m.T @ m)                       # ascending
    v = evecs[:, -rank:].flip(-1)
    s = evals[-rank:].flip(-1).clamp_min(0).sqrt()
    u = (m @ v) / s.clamp_min(torch.finfo(m.dtype).tiny)            # zero columns where s == 0
    return u, s, v.T


def check_rank(rank, out_features: int, in_features: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise InputError(f"rank must be an int, got {rank!r}", "rank")
    if not 1 <= rank <= min(out_features, in_features):
        raise InputError(f"rank must be in 1..{min(out_features, in_features)} for a "
                         f"{out_features}x{in_features} layer, got {rank}", "rank")
    return rank


class LowRankLinear(StructuredLinear):
    """W_hat = up @ down (rank r): y = up(down(x)) + bias, r * (in + out) weights."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.rank = check_rank(rank, out_features, in_features)
        kw = factory(device, dtype)
        self.down = nn.Parameter(torch.empty(rank, in_features, **kw).uniform_(-1, 1) / in_features ** 0.5)
        self.up = nn.Parameter(torch.empty(out_features, rank, **kw).uniform_(-1, 1) / rank ** 0.5)

    def _set_svd(self, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> None:
        """W_hat = u diag(s) vh (r triplets); sqrt(s) on each side keeps the factors balanced for training."""
        root = s.sqrt()
        self.up.copy_(u * root)
        self.down.copy_(root[:, None] * vh)

    def _set_truncation(self, m: torch.Tensor) -> None:
        """W_hat = the best rank-r approximation of m (Eckart-Young)."""
        self._set_svd(*top_svd(m.detach().to(torch.float64), self.rank))

    @classmethod
    def from_linear(cls, linear: nn.Module, rank: int) -> "LowRankLinear":
        """Truncated SVD of the dense weight: the Frobenius optimum (Eckart-Young)."""
        layer = cls(rank=rank, **cls.dense_args(linear))
        with torch.no_grad():
            layer._set_truncation(linear_weight(linear))
        layer.copy_bias_(linear)
        return layer

    @torch.no_grad()
    def fit_(self, weight: torch.Tensor, stats: InputStats, ridge: float = 1e-4) -> "LowRankLinear":
        """Activation-aware (whitened) SVD: Eckart-Young truncation of K L^-T, then times L^-1.

        f = ||W_hat L - M||_F^2 + const with M = K L^-T, so the best rank-r W_hat L is M's
        truncated SVD U_r S_r V_r^T, and W_hat = U_r S_r (V_r^T L^-1).
        """
        chol = _cholesky(ridged_gram(stats, ridge))
        m = torch.linalg.solve_triangular(chol, cross(weight, stats).T, upper=False).T   # K L^-T
        u, s, vh = top_svd(m, self.rank)
        self._set_svd(u, s, torch.linalg.solve_triangular(chol.T, vh.T, upper=True).T)   # V_r^T L^-1
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(nn.functional.linear(x, self.down), self.up, self.bias)

    def to_dense(self) -> torch.Tensor:
        return self.up @ self.down

    def costs(self) -> dict:
        """Per token, as costs.dense_costs counts them: FLOPs (2 per multiply-add, 1 per bias add),
        weight bytes read, parameters."""
        return _weight_costs(self, 2 * self.rank * (self.in_features + self.out_features))

    def sizes(self) -> dict:
        return {"rank": self.rank}


# ---------------------------------------------------------------- block diagonal

def check_num_blocks(num_blocks, out_features: int, in_features: int) -> int:
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int):
        raise InputError(f"num_blocks must be an int, got {num_blocks!r}", "num_blocks")
    if not 1 <= num_blocks <= min(out_features, in_features):
        raise InputError(f"num_blocks must be in 1..{min(out_features, in_features)} for a "
                         f"{out_features}x{in_features} layer, got {num_blocks}", "num_blocks")
    return num_blocks


class BlockDiagonalLinear(StructuredLinear):
    """k diagonal blocks: output group i depends only on input group i.

    Blocks are ceil(out/k) x ceil(in/k), stored as blocks[k, out_block, in_block]; when k does
    not divide a dimension it is zero-padded like the circulant (padding stored, never data).
    """

    def __init__(self, in_features: int, out_features: int, num_blocks: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.num_blocks = check_num_blocks(num_blocks, out_features, in_features)
        self.out_block, self.in_block = math.ceil(out_features / num_blocks), math.ceil(in_features / num_blocks)
        self.blocks = nn.Parameter(torch.empty(num_blocks, self.out_block, self.in_block, **factory(device, dtype))
                                   .uniform_(-1, 1) / self.in_block ** 0.5)

    def _diagonal_blocks(self, matrix: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """The k diagonal (rows x cols) blocks of `matrix`, zero-padded to k*rows x k*cols."""
        k = self.num_blocks
        padded = nn.functional.pad(matrix, (0, k * cols - matrix.shape[1], 0, k * rows - matrix.shape[0]))
        grid = padded.reshape(k, rows, k, cols)
        return grid[torch.arange(k), :, torch.arange(k), :]

    @classmethod
    def from_linear(cls, linear: nn.Module, num_blocks: int) -> "BlockDiagonalLinear":
        """Keep W's diagonal blocks: the Frobenius optimum (least squares with identity input)."""
        layer = cls(num_blocks=num_blocks, **cls.dense_args(linear))
        with torch.no_grad():
            layer.blocks.copy_(layer._diagonal_blocks(linear_weight(linear).detach(), layer.out_block, layer.in_block))
        layer.copy_bias_(linear)
        return layer

    @torch.no_grad()
    def fit_(self, weight: torch.Tensor, stats: InputStats, ridge: float = 1e-4) -> "BlockDiagonalLinear":
        """Per-block ridge least squares: f splits over blocks, D_i = K_ii A_ii^-1."""
        a, k = ridged_gram(stats, ridge), cross(weight, stats)
        pad = self.num_blocks * self.in_block - self.in_features
        # Identity on padded inputs keeps each block's Gram invertible; K is zero there, so D is too.
        a = torch.block_diag(a, torch.eye(pad, dtype=a.dtype, device=a.device))
        a_blocks = self._diagonal_blocks(a, self.in_block, self.in_block)
        k_blocks = self._diagonal_blocks(k, self.out_block, self.in_block)
        chol = _cholesky(a_blocks)
        self.blocks.copy_(torch.cholesky_solve(k_blocks.transpose(1, 2), chol).transpose(1, 2))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = nn.functional.pad(x.reshape(-1, self.in_features), (0, self.num_blocks * self.in_block - self.in_features))
        y = torch.bmm(x.reshape(-1, self.num_blocks, self.in_block).transpose(0, 1),
                      self.blocks.transpose(1, 2).to(x.dtype))                   # (k, N, out_block)
        y = y.transpose(0, 1).reshape(x.shape[0], -1)[:, :self.out_features]
        return self.add_bias(y).reshape(*lead, self.out_features)

    def to_dense(self) -> torch.Tensor:
        return torch.block_diag(*self.blocks)[:self.out_features, :self.in_features]

    def costs(self) -> dict:
        """Per token, as LowRankLinear.costs (padding included: it is computed)."""
        return _weight_costs(self, 2 * self.blocks.numel())

    def sizes(self) -> dict:
        return {"num_blocks": self.num_blocks}


# ---------------------------------------------------------------- circulant + low rank

class CirculantPlusLowRankLinear(StructuredLinear):
    """W_hat = C + U V: a block-circulant part plus a low-rank part, one shared bias."""

    def __init__(self, in_features: int, out_features: int, block_size: int, rank: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.circulant = BlockCirculantLinear(in_features, out_features, block_size, bias=False,
                                              device=device, dtype=dtype)
        self.lowrank = LowRankLinear(in_features, out_features, rank, bias=False, device=device, dtype=dtype)

    @property
    def block_size(self) -> int:
        return self.circulant.block_size

    @property
    def rank(self) -> int:
        return self.lowrank.rank

    def _alternate(self, target, fit_circulant, fit_lowrank, objective, rounds: int) -> "CirculantPlusLowRankLinear":
        """Alternating exact minimisation over the two parts; fit_history = the objective after each step.

        Starts from the better of the two parts fitted alone (the other one zero), so the result
        is never worse than either structure on its own, and each step can only lower the objective.
        """
        fit_circulant(target)
        fit_lowrank(target)
        f_circulant, f_lowrank = objective(self.circulant.to_dense()), objective(self.lowrank.to_dense())
        if f_circulant <= f_lowrank:
            self.lowrank.up.zero_()
            steps = [lambda: fit_lowrank(target - self.circulant.to_dense()),
                     lambda: fit_circulant(target - self.lowrank.to_dense())]
        else:
            self.circulant.c.zero_()
            steps = [lambda: fit_circulant(target - self.lowrank.to_dense()),
                     lambda: fit_lowrank(target - self.circulant.to_dense())]
        self.fit_history = [min(f_circulant, f_lowrank)]
        for _ in range(rounds):
            for step in steps:
                step()
                self.fit_history.append(objective(self.to_dense()))
        return self

    @classmethod
    def from_linear(cls, linear: nn.Module, block_size: int, rank: int, rounds: int = 4) -> "CirculantPlusLowRankLinear":
        """Alternating Frobenius fit: circulant projection of W - UV, truncated SVD of W - C."""
        layer = cls(block_size=block_size, rank=rank, **cls.dense_args(linear))
        w = linear_weight(linear).detach().double()
        with torch.no_grad():
            layer._alternate(
                w,
                lambda t: layer.circulant.c.copy_(circulant.project_frobenius(t, block_size)),
                layer.lowrank._set_truncation,
                lambda w_hat: float(((w - w_hat.double()) ** 2).sum()),
                rounds)
        layer.copy_bias_(linear)
        return layer

    @torch.no_grad()
    def fit_(self, weight: torch.Tensor, stats: InputStats, ridge: float = 1e-4,
             rounds: int = 4) -> "CirculantPlusLowRankLinear":
        """Alternating activation-aware fit; fit_history = the objective (fit_objective) after each step.

        With A = xx + lam I and W* = K A^-1, the objective equals that of stats (A, A) and target
        W*, and fixing one part leaves the same problem for the other with target W* - other.
        """
        device = self.circulant.c.device  # the parts' residual targets are formed on the module's device
        a = ridged_gram(stats, ridge).to(device)
        w_star = torch.linalg.solve(a, cross(weight, stats).to(device).T).T
        whitened = InputStats(xx=a, xt=a, n=stats.n)
        return self._alternate(
            w_star,
            # A is already ridged; the circulant fit's own tiny ridge only keeps padded blocks solvable.
            lambda t: self.circulant.fit_(t, whitened, ridge=1e-10),
            lambda t: self.lowrank.fit_(t, whitened, ridge=0.0),
            lambda w_hat: fit_objective(w_hat, w_star, whitened),
            rounds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_bias(self.circulant(x) + self.lowrank(x))

    def to_dense(self) -> torch.Tensor:
        return self.circulant.to_dense() + self.lowrank.to_dense()

    def costs(self) -> dict:
        """Per token: the circulant part as costs.circulant_costs counts it (its spectra are what is
        read), plus the low-rank part and the bias."""
        parts = [layer_costs(self.circulant), self.lowrank.costs(), _weight_costs(self, 0)]
        return {k: sum(c[k] for c in parts) for k in ("flops", "bytes", "params")}

    def sizes(self) -> dict:
        return {"block_size": self.block_size, "rank": self.rank}


# ---------------------------------------------------------------- budgets

def circulant_params(out_features: int, in_features: int, block_size: int) -> int:
    """Weights of a block-circulant of block size b on this shape (padding included, as stored)."""
    p, q = circulant.grid_shape(out_features, in_features, block_size)
    return p * q * block_size


def blockdiag_params(out_features: int, in_features: int, num_blocks: int) -> int:
    return num_blocks * math.ceil(out_features / num_blocks) * math.ceil(in_features / num_blocks)


def rank_for_budget(out_features: int, in_features: int, budget: int) -> int:
    """Largest rank whose r * (in + out) weights fit in `budget` (0 if none does)."""
    return budget // (out_features + in_features)


def num_blocks_for_budget(out_features: int, in_features: int, budget: int) -> int:
    """Fewest diagonal blocks (so the largest blocks) whose weights fit in `budget` (0 if none do)."""
    for k in range(1, min(out_features, in_features) + 1):
        if blockdiag_params(out_features, in_features, k) <= budget:
            return k
    return 0


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
    module = BlockCirculantLinear

    @classmethod
    def from_options(cls, size, rank, **where):
        return cls(block_size=size, **where)

    def block_size_for(self, name: str) -> int:
        return self.size_override(name) or self.block_size

    def size_for(self, name, out_features, in_features):
        return {"block_size": check_block_size(self.block_size_for(name), out_features, in_features)}


@register("lowrank")
@dataclass
class LowRankConfig(StructureConfig):
    """Low-rank W_hat = U V for the selected layers (built by truncated SVD; `--fit aware` whitens).

    rank: the same rank everywhere; or budget_block_size B: per module the largest rank whose
    weights fit in the parameter count of a block-circulant of block size B on that shape.
    targets / layers: as in CirculantConfig.
    """

    rank: int | None = None
    budget_block_size: int | None = None
    targets: Sequence[str] | str = ("mlp",)
    layers: Iterable[int] | str | None = None
    block_sizes: dict[str, int] = field(default_factory=dict)  # per-module budget block sizes, as CirculantConfig's
    module = LowRankLinear
    takes_rank = True

    def __post_init__(self):
        _one_of("LowRankConfig", rank=self.rank, budget_block_size=self.budget_block_size)
        if self.block_sizes and self.rank is not None:
            raise InputError("LowRankConfig: block_sizes sets per-module budgets; it needs budget_block_size, "
                             "not rank", "block_sizes")

    @classmethod
    def from_options(cls, size, rank, **where):
        return cls(rank=rank, **where) if rank is not None else cls(budget_block_size=size, **where)

    def size_for(self, name, out_features, in_features):
        rank = self.rank
        if rank is None:
            budget = self.budget_weights(out_features, in_features, name)
            rank = rank_for_budget(out_features, in_features, budget)
            if rank == 0:
                raise _too_small(out_features, in_features, self.size_override(name) or self.budget_block_size,
                                 f"rank 1 ({out_features + in_features:,} weights)")
        return {"rank": check_rank(rank, out_features, in_features)}


@register("blockdiag")
@dataclass
class BlockDiagonalConfig(StructureConfig):
    """Block-diagonal W_hat with num_blocks diagonal blocks (built from W's diagonal blocks).

    num_blocks: the same number of blocks everywhere (each ceil(out/k) x ceil(in/k)); or
    budget_block_size B: per module the fewest blocks that fit in the parameter count of a
    block-circulant of block size B (num_blocks = B when B divides both dimensions).
    """

    num_blocks: int | None = None
    budget_block_size: int | None = None
    targets: Sequence[str] | str = ("mlp",)
    layers: Iterable[int] | str | None = None
    module = BlockDiagonalLinear

    def __post_init__(self):
        _one_of("BlockDiagonalConfig", num_blocks=self.num_blocks, budget_block_size=self.budget_block_size)

    @classmethod
    def from_options(cls, size, rank, **where):
        return cls(budget_block_size=size, **where)

    def size_for(self, name, out_features, in_features):
        k = self.num_blocks
        if k is None:
            budget = self.budget_weights(out_features, in_features)
            k = num_blocks_for_budget(out_features, in_features, budget)
            if k == 0:
                raise _too_small(out_features, in_features, self.budget_block_size, "any block-diagonal")
        return {"num_blocks": check_num_blocks(k, out_features, in_features)}


@register("hybrid")
@dataclass
class HybridConfig(StructureConfig):
    """Block-circulant plus low-rank, fitted alternately.

    block_size and rank: explicit sizes; or budget_block_size B: per module a circulant part of
    block size `block_size` (default 2B, half the budget) and the largest rank that fits in the
    rest of the parameter count of a block-circulant of block size B.
    """

    block_size: int | None = None
    rank: int | None = None
    budget_block_size: int | None = None
    targets: Sequence[str] | str = ("mlp",)
    layers: Iterable[int] | str | None = None
    module = CirculantPlusLowRankLinear
    takes_rank = True

    def __post_init__(self):
        if self.budget_block_size is None:
            if self.block_size is None or self.rank is None:
                raise InputError("HybridConfig: give block_size and rank, or budget_block_size", "budget_block_size")
        else:
            if self.rank is not None:
                raise InputError("HybridConfig: give rank or budget_block_size, not both "
                                 "(the budget sets the rank)", "rank")
            if self.block_size is None:
                self.block_size = 2 * self.budget_block_size

    @classmethod
    def from_options(cls, size, rank, **where):
        if rank is not None:  # circulant part of block size `size` plus that rank
            return cls(block_size=size, rank=rank, **where)
        return cls(budget_block_size=size, **where)

    def size_for(self, name, out_features, in_features):
        check_block_size(self.block_size, out_features, in_features)
        rank = self.rank
        if rank is None:
            budget = self.budget_weights(out_features, in_features)
            rest = budget - circulant_params(out_features, in_features, self.block_size)
            rank = rank_for_budget(out_features, in_features, max(rest, 0))
            if rank == 0:
                raise _too_small(out_features, in_features, self.budget_block_size,
                                 f"a circulant of block size {self.block_size} plus rank 1")
        return {"block_size": self.block_size, "rank": check_rank(rank, out_features, in_features)}


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
