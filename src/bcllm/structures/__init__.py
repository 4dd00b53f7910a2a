"""Structures that replace a dense nn.Linear: one file per structure (module, config, fused
variant), the shared base, registry and budgets in base.py, costs per layer and model in costs.py."""

from .base import (STRUCTURES, StructureConfig, StructuredLinear, budget_report, check_block_size, config_class,
                   factory, fitted_modules, linear_weight, register, structure_config)
from .circulant import BlockCirculantLinear, CirculantConfig, FusedCirculantMLP, fuse_circulant_mlp_
from .lowrank import LowRankConfig, LowRankLinear
from .blockdiag import BlockDiagonalConfig, BlockDiagonalLinear
from .hybrid import CirculantPlusLowRankLinear, HybridConfig
from .quantized import PruneConfig, PrunedLinear, QuantConfig, QuantizedLinear
from .costs import layer_costs, model_costs

__all__ = ["STRUCTURES", "StructureConfig", "StructuredLinear", "budget_report", "check_block_size", "config_class",
           "factory", "fitted_modules", "linear_weight", "register", "structure_config", "BlockCirculantLinear",
           "CirculantConfig", "FusedCirculantMLP", "fuse_circulant_mlp_", "LowRankConfig", "LowRankLinear",
           "BlockDiagonalConfig", "BlockDiagonalLinear", "CirculantPlusLowRankLinear", "HybridConfig", "layer_costs",
           "model_costs", "PruneConfig", "PrunedLinear", "QuantConfig", "QuantizedLinear"]
