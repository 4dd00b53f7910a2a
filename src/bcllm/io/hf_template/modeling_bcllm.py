"""Structured linear layers of a bcllm student, for `from_pretrained(..., trust_remote_code=True)`.

Written by `bcllm export`, with circulant_math.py beside it; needs only torch and transformers.
config.json holds the base model's config (its own model_type, so AutoConfig and AutoTokenizer need no
remote code) plus `bcllm_modules` {module name: {"type": ..., sizes}}: the base architecture is built
from the config, those modules are swapped in, then transformers loads the weights, saved as the
variant WEIGHTS_VARIANT (model.bcllm.safetensors): a dense load of the folder without
trust_remote_code finds no model.safetensors and fails loudly instead of loading wrong weights.

The circulant math is bcllm's own: circulant_math.py, a verbatim copy of bcllm.ops.circulant_math.
Block-circulant: a weight (out, in) is a p x q grid of b x b circulant blocks stored as c[p, q, b],
block (i, j)[r, s] = c[i, j, (r - s) mod b] (first-column convention), so y = irfft(rfft(c) *
rfft(x)); inputs are zero-padded to q*b and outputs cropped to `out`. Low-rank: y = up(down(x)).
Block-diagonal: blocks[k, ceil(out/k), ceil(in/k)], padded the same way. Circulant + low-rank: the
sum of the two, one shared bias.
"""

import math

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .circulant_math import cached_spectra, circulant_matmul_planar, grid_shape

WEIGHTS_VARIANT = "bcllm"  # the weights file is model.bcllm.safetensors (bcllm.io.artifact uses the same name)


class BlockCirculantLinear(nn.Module):
    def __init__(self, in_features, out_features, block_size, bias=True):
        super().__init__()
        self.in_features, self.out_features, self.block_size = in_features, out_features, block_size
        p, q = grid_shape(out_features, in_features, block_size)
        self.c = nn.Parameter(torch.zeros(p, q, block_size))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._spectra = self._spectra_key = None  # the spectra cache (circulant_math.cached_spectra)

    def spectra(self):
        """Planar spectra (2, ceil(b/2), q, p) of c; cached unless gradients must flow to c."""
        return cached_spectra(self, self.c)

    def forward(self, x):
        lead, rows = x.shape[:-1], x.reshape(-1, self.in_features).float()
        args = (self.spectra(), self.out_features, self.in_features, self.block_size)
        if torch.is_autocast_enabled(x.device.type):  # float32 throughout, as in bcllm
            with torch.autocast(x.device.type, enabled=False):
                y = circulant_matmul_planar(rows, *args)
        else:
            y = circulant_matmul_planar(rows, *args)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.reshape(*lead, self.out_features).to(x.dtype)


class LowRankLinear(nn.Module):
    def __init__(self, in_features, out_features, rank, bias=True):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Parameter(torch.zeros(rank, in_features))
        self.up = nn.Parameter(torch.zeros(out_features, rank))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        return nn.functional.linear(nn.functional.linear(x, self.down), self.up, self.bias)


class BlockDiagonalLinear(nn.Module):
    def __init__(self, in_features, out_features, num_blocks, bias=True):
        super().__init__()
        self.in_features, self.out_features, self.num_blocks = in_features, out_features, num_blocks
        self.out_block, self.in_block = math.ceil(out_features / num_blocks), math.ceil(in_features / num_blocks)
        self.blocks = nn.Parameter(torch.zeros(num_blocks, self.out_block, self.in_block))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        lead, k = x.shape[:-1], self.num_blocks
        x = nn.functional.pad(x.reshape(-1, self.in_features), (0, k * self.in_block - self.in_features))
        y = torch.bmm(x.reshape(-1, k, self.in_block).transpose(0, 1),
                      self.blocks.transpose(1, 2).to(x.dtype))                   # (k, N, out_block)
        y = y.transpose(0, 1).reshape(x.shape[0], -1)[:, :self.out_features]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)


class CirculantPlusLowRankLinear(nn.Module):
    def __init__(self, in_features, out_features, block_size, rank, bias=True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.circulant = BlockCirculantLinear(in_features, out_features, block_size, bias=False)
        self.lowrank = LowRankLinear(in_features, out_features, rank, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        y = self.circulant(x) + self.lowrank(x)
        return y + self.bias.to(y.dtype) if self.bias is not None else y


STRUCTURES = {cls.__name__: cls for cls in
              (BlockCirculantLinear, LowRankLinear, BlockDiagonalLinear, CirculantPlusLowRankLinear)}


def swap_modules(model, modules):
    """Replace each named module of `model` by the structured module its entry describes."""
    for name, entry in modules.items():
        sizes = {k: v for k, v in entry.items() if k != "type"}
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, STRUCTURES[entry["type"]](**sizes))


_CLASSES = {}


def structured_class(config):
    """The base architecture's causal-LM class (from the config's type), with the structured
    modules swapped in at construction, before any weight is loaded. Named BcllmForCausalLM so
    that save_pretrained writes an auto_map that loads it again."""
    base = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    if base not in _CLASSES:
        def __init__(self, config, *args, **kwargs):
            base.__init__(self, config, *args, **kwargs)
            swap_modules(self, getattr(config, "bcllm_modules", {}))

        def save_pretrained(self, save_directory, *args, **kwargs):
            kwargs["variant"] = WEIGHTS_VARIANT
            base.save_pretrained(self, save_directory, *args, **kwargs)

        _CLASSES[base] = type("BcllmForCausalLM", (base,), {
            "__init__": __init__, "save_pretrained": save_pretrained, "__module__": __name__,
            "_auto_class": "AutoModelForCausalLM"})
    return _CLASSES[base]


class BcllmForCausalLM(PreTrainedModel):
    """Entry point named in config.json's auto_map; returns an instance of structured_class(config),
    its weights read from the WEIGHTS_VARIANT file."""

    config_class = PretrainedConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        if config is None:
            config = AutoConfig.from_pretrained(pretrained_model_name_or_path)
        kwargs["variant"] = WEIGHTS_VARIANT
        return structured_class(config).from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        return structured_class(config)._from_config(config, **kwargs)

    from_config = _from_config
