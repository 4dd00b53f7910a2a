"""Fused block-circulant gated MLP (Llama, Qwen2, Mistral, Gemma style).

gate_proj and up_proj read the same input, so once both are BlockCirculantLinear with
the same block size they share one rfft, one batched matmul over the concatenated
spectra and one inverse transform (docs/DESIGN.md section 4). down_proj runs as it is.

    model, tok = load_model("smollm2-135m")
    compress_(model, CirculantConfig(block_size=16, targets="mlp"))
    fuse_circulant_mlp_(model)        # same outputs, fewer kernel launches per token

Works under autograd as well as in eval: the state dict keeps the unfused names
(mlp.gate_proj.c, ...), so checkpoints load either way.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import InputError
from . import circulant
from .modules import BlockCirculantLinear


class FusedCirculantMLP(nn.Module):
    """down_proj(act_fn(gate_proj(x)) * up_proj(x)) with gate and up in one circulant product."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        self._spec = None
        self._spec_key = None

    def spectra(self) -> torch.Tensor:
        """(2, F, q, p_gate + p_up) spectra of gate and up side by side; cached as in BlockCirculantLinear."""
        g, u = self.gate_proj.c, self.up_proj.c
        if torch.compiler.is_compiling() and self._spec is not None:
            return self._spec  # as in BlockCirculantLinear.spectra
        if torch.is_grad_enabled() and (g.requires_grad or u.requires_grad):
            return circulant.spectra(torch.cat([g, u]))
        key = (g._version, g.data_ptr(), u._version, u.data_ptr(), g.device)
        if self._spec_key != key:
            with torch.inference_mode(False), torch.no_grad():
                self._spec = circulant.spectra(torch.cat([g, u]))
            self._spec_key = key
        return self._spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj, self.up_proj
        if x.shape[-1] != gate.in_features:
            raise InputError(f"expected input with last dimension {gate.in_features}, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        up_start = gate.c.shape[0] * gate.block_size  # gate's padded rows come first
        y = circulant.circulant_matmul(x.reshape(-1, gate.in_features).float(), self.spectra(),
                                       up_start + up.out_features, gate.in_features, gate.block_size)
        g, u = y[:, :gate.out_features], y[:, up_start:]
        if gate.bias is not None:
            g = g + gate.bias.float()
        if up.bias is not None:
            u = u + up.bias.float()
        # Cast before the activation, as the unfused layers would, so 16-bit models match too.
        h = self.act_fn(g.to(x.dtype)) * u.to(x.dtype)
        return self.down_proj(h.reshape(*lead, gate.out_features))


def fusable(mlp: nn.Module) -> bool:
    gate, up = getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)
    return (isinstance(gate, BlockCirculantLinear) and isinstance(up, BlockCirculantLinear)
            and gate.block_size == up.block_size and gate.in_features == up.in_features
            and gate.out_features == up.out_features
            and hasattr(mlp, "down_proj") and hasattr(mlp, "act_fn"))


def fuse_circulant_mlp_(model: nn.Module) -> list[str]:
    """Replace, in place, every gated MLP whose gate_proj and up_proj are BlockCirculantLinear
    with equal block size by a FusedCirculantMLP. Returns the names of the fused MLPs."""
    from .surgery import set_module

    names = [n for n, m in model.named_modules() if not isinstance(m, FusedCirculantMLP) and fusable(m)]
    for name in names:
        set_module(model, name, FusedCirculantMLP(model.get_submodule(name)))
    return names
