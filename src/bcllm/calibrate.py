"""Calibration: fit structured layers to the inputs they actually see.

Every fit in bcllm (any structure) minimises, over calibration tokens n,

    sum_n || W_hat x_s,n  -  W x_t,n ||^2

where x_s is the input the compressed layer sees and x_t the input the original
layer sees at the same position (x_s == x_t unless the fit is sequential). That
objective depends on the data only through two (in, in) matrices, accumulated
over batches (memory independent of the number of tokens):
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
