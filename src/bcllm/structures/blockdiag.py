"""Block diagonal: k diagonal blocks (BlockDiagonalLinear, BlockDiagonalConfig)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from .base import (InputStats, StructureConfig, StructuredLinear, _cholesky, _one_of, _too_small, _weight_costs,
                   check_size, cross, factory, linear_weight, register, ridged_gram)


def check_num_blocks(num_blocks, out_features: int, in_features: int) -> int:
    return check_size(num_blocks, "num_blocks", out_features, in_features)


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


def blockdiag_params(out_features: int, in_features: int, num_blocks: int) -> int:
    return num_blocks * math.ceil(out_features / num_blocks) * math.ceil(in_features / num_blocks)



def num_blocks_for_budget(out_features: int, in_features: int, budget: int) -> int:
    """Fewest diagonal blocks (so the largest blocks) whose weights fit in `budget` (0 if none do)."""
    for k in range(1, min(out_features, in_features) + 1):
        if blockdiag_params(out_features, in_features, k) <= budget:
            return k
    return 0



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

