"""Second moments of a layer's calibration inputs: all the data an activation-aware fit reads.

Every fit in bcllm minimises sum_n || W_hat x_s,n - W x_t,n ||^2 over calibration tokens n
(x_s: the input the compressed layer sees, x_t: the original layer's input at the same
position), which depends on the data only through the two (in, in) matrices below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import dist


@dataclass
class InputStats:
    """Second moments of one layer's calibration inputs, float64.

    xx: (in, in) sum_n x_s,n x_s,n^T
    xt: (in, in) sum_n x_s,n x_t,n^T  (equals xx when the inputs are the same)
    n:  number of tokens accumulated
    The objective above is tr(W_hat xx W_hat^T) - 2 tr(W_hat xt W^T) + const.
    """

    xx: torch.Tensor
    xt: torch.Tensor
    n: int
    rows: torch.Tensor | None = None  # a sample of the input rows, when asked for (calibrate.input_stats)

    @classmethod
    def zeros(cls, in_features: int, shared: bool = True, device=None) -> "InputStats":
        """Empty statistics; shared=True makes xt the same tensor as xx (x_s == x_t)."""
        xx = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        return cls(xx, xx if shared else torch.zeros_like(xx), 0)

    def add_(self, x_s: torch.Tensor, x_t: torch.Tensor | None = None) -> None:
        """Accumulate rows (N, in). Products in float32 (float64 inputs stay float64), sums in float64."""
        dtype = torch.float64 if x_s.dtype == torch.float64 else torch.float32
        x_s = x_s.to(dtype)
        self.xx += (x_s.T @ x_s).to(torch.float64)
        if self.xt is not self.xx:
            self.xt += (x_s.T @ x_t.to(dtype)).to(torch.float64)
        self.n += x_s.shape[0]

    def all_reduce_(self) -> "InputStats":
        """Sum the statistics over the ranks of a data-parallel run (each accumulated its share of
        the batches: dist.shard); every rank then holds the statistics of all batches."""
        if dist.world() > 1:
            dist.all_reduce_sum(self.xx)
            if self.xt is not self.xx:
                dist.all_reduce_sum(self.xt)
            self.n = int(dist.all_reduce_sum(torch.tensor([self.n], dtype=torch.float64)).item())
        return self
