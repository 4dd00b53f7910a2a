"""Model surgery: find the linear layers a config selects and replace them in place.

`compress_(model, config)` is the one verb; the config (a registered structure, see
structures.py) decides what replaces each selected layer. Selection follows the
PEFT `target_modules` habit: a target is a module-name suffix (`gate_proj`), a
glob over the full name (`*.mlp.*`), or a shorthand (`mlp`, `attn`). `layers`
restricts the match to decoder-layer indices.
"""

from __future__ import annotations

import fnmatch
import re
import torch
from torch import nn

from .errors import InputError

# Shorthands: a linear layer inside a decoder layer belongs to `mlp` / `attn` when a
# component of its name says so. Covers Llama/Qwen/Mistral/Gemma (mlp, self_attn),
# GPT-2 (mlp, attn), Phi (mlp, self_attn), Falcon/GPT-NeoX (mlp, attention).
SHORTHANDS = {
    "mlp": ("mlp", "feed_forward", "ffn", "block_sparse_moe"),
    "attn": ("self_attn", "attn", "attention", "self_attention"),
}


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def parse_layers(spec, num_layers: int) -> list[int] | None:
    """'all' | '10-19' | '0,3,5' | '0-3,8' | iterable of ints -> sorted indices (None = all)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return None
    if isinstance(spec, int):
        spec = [spec]
    if isinstance(spec, str):
        indices = []
        for part in spec.replace(" ", "").split(","):
            m = re.fullmatch(r"(-?\d+)(?:-(\d+))?", part)
            if not m:
                raise InputError(f"cannot parse layers {spec!r}: use 'all', a range '10-19', "
                                 f"a list '0,3,5' or a mix '0-3,8'", "layers")
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if hi < lo:
                raise InputError(f"layer range {part!r} is empty (end before start)", "layers")
            indices.extend(range(lo, hi + 1))
    else:
        indices = [int(i) for i in spec]
    bad = sorted({i for i in indices if not 0 <= i < num_layers})
    if bad:
        raise InputError(f"layer indices {bad} out of range: the model has {num_layers} decoder "
                         f"layers, allowed 0..{num_layers - 1}", "layers")
    return sorted(set(indices))


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: the longest ModuleList of identical block types."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and any(is_linear(m) for m in module[0].modules()):
                if best is None or len(module) > len(best[1]):
                    best = (name, module)
    if best is None:
        raise InputError(f"{type(model).__name__} has no ModuleList of decoder layers containing "
                         f"linear layers; bcllm needs a model whose decoder layers are a ModuleList")
    return best


def layer_index(name: str, layers_prefix: str) -> int | None:
    """Decoder-layer index of a module name, or None outside the decoder layers."""
    prefix = layers_prefix + "." if layers_prefix else ""
    if not name.startswith(prefix):
        return None
    head = name[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def matches(name: str, target: str) -> bool:
    parts = name.split(".")
    if target in SHORTHANDS:
        return any(p in SHORTHANDS[target] for p in parts[:-1])
    if any(ch in target for ch in "*?["):
        return fnmatch.fnmatchcase(name, target)
    return name == target or name.endswith("." + target)


def normalize_targets(targets) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = [t for t in targets.replace(" ", "").split(",") if t]
    targets = tuple(targets)
    if not targets:
        raise InputError("targets is empty: give module-name suffixes, globs, 'mlp' or 'attn'", "targets")
    return targets


def select_modules(model: nn.Module, targets, layers=None) -> dict[str, nn.Module]:
    """{full name: module} of the linear layers that `targets` and `layers` select.

    Raises ValueError naming what exists when a target matches nothing or a selected
    module is not a linear layer.
    """
    targets = normalize_targets(targets)
    prefix, blocks = decoder_layers(model)
    wanted_layers = parse_layers(layers, len(blocks))
    named = dict(model.named_modules())
    linear_names = [n for n, m in named.items() if is_linear(m)]

    selected = {}
    for target in targets:
        hits = [n for n in named if n and matches(n, target)]
        if target in SHORTHANDS:
            hits = [n for n in hits if is_linear(named[n])]
        if not hits:
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
            raise InputError(f"target {target!r} matches no module. Linear module names in this model "
                             f"end in: {', '.join(suffixes)}; shorthands: {', '.join(SHORTHANDS)}", "targets")
        for n in hits:
            if not is_linear(named[n]):
                raise InputError(f"target {target!r} matches {n!r}, a {type(named[n]).__name__}, "
                                 f"not a linear layer (nn.Linear or Conv1D)", "targets")
            idx = layer_index(n, prefix)
            if wanted_layers is not None and idx not in wanted_layers:
                continue
            if idx is None and target in SHORTHANDS:
                continue
            selected[n] = named[n]
    return selected


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def compress_(model: nn.Module, config) -> dict:
    """Replace the selected linear layers of `model` in place; return a summary.

    The config type chooses the structure (config.build). Everything is checked
    before anything is replaced, so a bad config leaves the model unchanged. The summary
    holds each module's sizes, and with a budgeted config the parameter count of the
    circulant budget the modules were cut from.
    """
    selected = select_modules(model, config.targets, config.layers)
    if not selected:
        raise InputError(f"targets {config.targets!r} with layers {config.layers!r} select no module", "layers")
    for name, linear in selected.items():
        config.check(name, linear)
    budgets = [config.budget_params(linear, name) for name, linear in selected.items()]
    replaced = compressed = replaced_bytes = structured_bytes = 0
    sizes = {}
    before = num_params(model)
    for name, linear in selected.items():
        new = config.build(name, linear)
        set_module(model, name, new)
        replaced += num_params(linear)
        replaced_bytes += sum(p.numel() * p.element_size() for p in linear.parameters())
        compressed += new.num_params  # a structure's own count: quantized codes and pruned masks are buffers
        structured_bytes += new.costs()["bytes"]
        sizes[name] = new.sizes()
    after = before - replaced + compressed
    return {
        "config": config.describe(),
        "modules": list(sizes),
        "num_modules": len(sizes),
        "sizes": sizes,
        "budget_params": None if None in budgets else sum(budgets),
        "replaced_params": replaced,
        "structured_params": compressed,  # every structure's (named circulant_params before; io.results reads both)
        "ratio": replaced / max(compressed, 1),
        "model_params_before": before,
        "model_params_after": after,
        # weight bytes as stored (float data at its dtype's width; quantized codes at their bits)
        "replaced_bytes": replaced_bytes,
        "structured_bytes": structured_bytes,
    }
