"""Low rank: W_hat = U V (LowRankLinear, LowRankConfig), built by truncated SVD; the aware fit whitens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from ..errors import InputError
from .base import (InputStats, StructureConfig, StructuredLinear, _cholesky, _one_of, _too_small, _weight_costs,
                   check_size, cross, factory, linear_weight, register, ridged_gram)


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
    return check_size(rank, "rank", out_features, in_features)


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


def rank_for_budget(out_features: int, in_features: int, budget: int) -> int:
    """Largest rank whose r * (in + out) weights fit in `budget` (0 if none does)."""
    return budget // (out_features + in_features)



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

