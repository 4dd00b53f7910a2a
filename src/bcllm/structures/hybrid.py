"""Circulant plus low rank: W_hat = C + U V, fitted alternately (CirculantPlusLowRankLinear, HybridConfig)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from ..errors import InputError
from ..ops import circulant
from .base import (InputStats, StructureConfig, StructuredLinear, _too_small, _weight_costs, check_block_size,
                   circulant_params, cross, fit_objective, linear_weight, register, ridged_gram)
from .circulant import BlockCirculantLinear
from .lowrank import LowRankLinear, check_rank, rank_for_budget


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
        parts = [self.circulant.costs(), self.lowrank.costs(), _weight_costs(self, 0)]
        return {k: sum(c[k] for c in parts) for k in ("flops", "bytes", "params")}

    def sizes(self) -> dict:
        return {"block_size": self.block_size, "rank": self.rank}


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

