"""Per-layer and per-model costs (FLOPs, weight bytes, parameters per token) of a model with any
structure in it, as the formulas of ops.costs count them (docs/DESIGN.md section 4)."""

from __future__ import annotations

from torch import nn

from ..ops.costs import circulant_costs, dense_costs  # noqa: F401 (re-exported)
from ..surgery import is_linear
from .base import linear_weight
from .circulant import BlockCirculantLinear, FusedCirculantMLP


def layer_costs(module: nn.Module) -> dict:
    """Costs of one nn.Linear / Conv1D / BlockCirculantLinear."""
    if isinstance(module, BlockCirculantLinear):
        return module.costs()
    weight = linear_weight(module)
    return dense_costs(*weight.shape, getattr(module, "bias", None) is not None, weight.element_size())


def model_costs(model: nn.Module) -> dict:
    """Summed per-token costs of every linear layer of a model (lm_head included), plus the
    count of each kind. A FusedCirculantMLP counts its gate and up once-transformed."""
    total = {"flops": 0.0, "bytes": 0, "params": 0, "dense_layers": 0, "circulant_layers": 0,
             "structured_layers": 0}

    def add(costs, kind, n=1):
        for k in ("flops", "bytes", "params"):
            total[k] += costs[k]
        total[kind] += n

    def walk(module):
        if isinstance(module, FusedCirculantMLP):
            gate = module.gate_proj
            add(circulant_costs(gate.out_features, gate.in_features, gate.block_size, gate.bias is not None,
                                gate.c.element_size(), outputs=2, spectra_bits=gate.spectra_bits),
                "circulant_layers", 2)
            walk(module.down_proj)
        elif isinstance(module, BlockCirculantLinear):
            add(layer_costs(module), "circulant_layers")
        elif is_linear(module):
            add(layer_costs(module), "dense_layers")
        elif callable(getattr(module, "costs", None)):  # other structures (bcllm.structures) count themselves
            add(module.costs(), "structured_layers")
        else:
            for child in module.children():
                walk(child)

    walk(model)
    return total
