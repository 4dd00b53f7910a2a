"""Structured linear layers of a bcllm student, for `from_pretrained(..., trust_remote_code=True)`.

Written by `bcllm export`; needs only torch and transformers. config.json holds the base model's
config plus `bcllm_modules` {module name: {"type": ..., sizes}}: the base architecture is built
from the config, those modules are swapped in, then transformers loads model.safetensors.

The math matches bcllm exactly. Block-circulant: a weight (out, in) is a p x q grid of b x b
circulant blocks stored as c[p, q, b], block (i, j)[r, s] = c[i, j, (r - s) mod b] (first-column
convention), so y = irfft(rfft(c) * rfft(x)); inputs are zero-padded to q*b and outputs cropped
to `out`. Low-rank: y = up(down(x)). Block-diagonal: blocks[k, ceil(out/k), ceil(in/k)], padded
the same way. Circulant + low-rank: the sum of the two, one shared bias.
"""

import functools
import json
import math
import os

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING


# As in bcllm.circulant: block DFTs as matmuls against (2F, b) tables up to this block size, FFTs above.
DFT_MATMUL_MAX_BLOCK = 64


@functools.lru_cache(maxsize=None)
def dft_tables(block_size, device):
    """(forward, inverse_p, inverse_q), each (2F, b) float32, rows ordered (frequency, part): the
    block DFT, and the complex combination with the inverse DFT of P = X S_re and Q = X S_im.
    F = ceil(b / 2): for even b frequency 0's Im rows carry the Nyquist frequency (see `spectra`)."""
    b, F = block_size, (block_size + 1) // 2
    angle = 2 * math.pi * torch.arange(F, dtype=torch.float64)[:, None] * torch.arange(b)[None, :] / b
    weight = torch.full((F, 1), 2.0, dtype=torch.float64)  # irfft counts the mirrored half twice, but not f = 0
    weight[0] = 1
    re, im = weight * torch.cos(angle) / b, -weight * torch.sin(angle) / b
    forward, inverse_p, inverse_q = (torch.stack([torch.cos(angle), -torch.sin(angle)], 1), torch.stack([re, im], 1),
                                     torch.stack([im, -re], 1))
    if b % 2 == 0:
        alternating = torch.cos(math.pi * torch.arange(b, dtype=torch.float64))
        forward[0, 1], inverse_q[0, 1] = alternating, alternating / b
    with torch.inference_mode(False):
        return tuple(t.reshape(2 * F, b).to(device=device, dtype=torch.float32) for t in (forward, inverse_p, inverse_q))


def fold_nyquist(z, b):
    """rfft output (..., b//2 + 1) -> (..., ceil(b/2)): for even b the real Nyquist value takes the
    place of frequency 0's zero imaginary part."""
    if b % 2:
        return z
    return torch.cat([torch.complex(z[..., :1].real, z[..., -1:].real), z[..., 1:-1]], dim=-1)


def unfold_nyquist(z, b):
    if b % 2:
        return z
    zero = torch.zeros_like(z[..., :1].real)
    return torch.cat([torch.complex(z[..., :1].real, zero), z[..., 1:], torch.complex(z[..., :1].imag, zero)], dim=-1)


def spectra(c):
    """Planar frequency-major spectra (2, ceil(b/2), q, p) float32 of c: real parts, imaginary parts
    of rfft(c), the Nyquist value folded into frequency 0 for even b (b floats per block)."""
    return torch.view_as_real(fold_nyquist(torch.fft.rfft(c.float(), dim=-1), c.shape[-1])).permute(3, 2, 1, 0).contiguous()


def circulant_matmul(x, spec, out_features, in_features, block_size):
    """y = x @ W.T for x (N, in) float32 and planar spectra (2, F, q, p); padding cropped."""
    n, b = x.shape[0], block_size
    _, F, q, p = spec.shape
    x = nn.functional.pad(x, (0, q * b - in_features)).reshape(n * q, b)
    if b <= DFT_MATMUL_MAX_BLOCK:
        forward, inverse_p, inverse_q = dft_tables(b, x.device)
        x_hat = (forward @ x.T).view(F, 2 * n, q)
    else:
        x_hat = torch.view_as_real(fold_nyquist(torch.fft.rfft(x, dim=-1), b)).view(n, q, F, 2)
        x_hat = x_hat.permute(2, 3, 0, 1).reshape(F, 2 * n, q)
    P, Q = torch.bmm(x_hat, spec[0]), torch.bmm(x_hat, spec[1])
    if b <= DFT_MATMUL_MAX_BLOCK:
        y = torch.addmm(P.view(2 * F, n * p).T @ inverse_p, Q.view(2 * F, n * p).T, inverse_q)
    else:
        y_hat = torch.complex(P[:, :n] - Q[:, n:], P[:, n:] + Q[:, :n])
        if b % 2 == 0:  # frequency 0 folded: its real part P_re, the Nyquist's Q_im
            y_hat = torch.cat([torch.complex(P[:1, :n], Q[:1, n:]), y_hat[1:]])
        y = torch.fft.irfft(unfold_nyquist(y_hat.permute(1, 2, 0), b), n=b, dim=-1)
    return y.reshape(n, p * b)[:, :out_features]


class BlockCirculantLinear(nn.Module):
    def __init__(self, in_features, out_features, block_size, bias=True):
        super().__init__()
        self.in_features, self.out_features, self.block_size = in_features, out_features, block_size
        p, q = math.ceil(out_features / block_size), math.ceil(in_features / block_size)
        self.c = nn.Parameter(torch.zeros(p, q, block_size))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._spec, self._spec_key = None, None

    def spectra(self):
        """Planar spectra of c (see `spectra`); cached unless gradients must flow to c."""
        if torch.is_grad_enabled() and self.c.requires_grad:
            return spectra(self.c)
        key = (self.c._version, self.c.data_ptr(), self.c.device)
        if self._spec_key != key:
            with torch.inference_mode(False), torch.no_grad():
                self._spec = spectra(self.c)
            self._spec_key = key
        return self._spec

    def forward(self, x):
        lead, rows = x.shape[:-1], x.reshape(-1, self.in_features).float()
        args = (self.spectra(), self.out_features, self.in_features, self.block_size)
        if torch.is_autocast_enabled(x.device.type):  # float32 throughout, as in bcllm
            with torch.autocast(x.device.type, enabled=False):
                y = circulant_matmul(rows, *args)
        else:
            y = circulant_matmul(rows, *args)
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
            base.save_pretrained(self, save_directory, *args, **kwargs)
            path = os.path.join(save_directory, "config.json")
            with open(path) as f:
                saved = json.load(f)
            saved["model_type"] = "bcllm"
            with open(path, "w") as f:
                json.dump(saved, f, indent=2, sort_keys=True)

        _CLASSES[base] = type("BcllmForCausalLM", (base,), {
            "__init__": __init__, "save_pretrained": save_pretrained, "__module__": __name__,
            "_auto_class": "AutoModelForCausalLM"})
    return _CLASSES[base]


class BcllmConfig(PretrainedConfig):
    """Entry point for AutoConfig. config.json says model_type "bcllm" so that loading without
    trust_remote_code fails loudly (instead of building the dense base with missing weights);
    this returns the base architecture's own config (type `bcllm_base_model_type`)."""

    model_type = "bcllm"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        config_dict, kwargs = PretrainedConfig.get_config_dict(pretrained_model_name_or_path, **kwargs)
        config_dict["model_type"] = config_dict["bcllm_base_model_type"]
        return CONFIG_MAPPING[config_dict["model_type"]].from_dict(config_dict, **kwargs)


class BcllmForCausalLM(PreTrainedModel):
    """Entry point named in config.json's auto_map; returns an instance of structured_class(config)."""

    config_class = BcllmConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        if config is None:
            config = BcllmConfig.from_pretrained(pretrained_model_name_or_path)
        return structured_class(config).from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        return structured_class(config)._from_config(config, **kwargs)

    from_config = _from_config
