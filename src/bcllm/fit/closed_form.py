"""Calibration: fit structured layers to the inputs they actually see.

Every fit in bcllm (any structure) minimises, over calibration tokens n,

    sum_n || W_hat x_s,n  -  W x_t,n ||^2

where x_s is the input the compressed layer sees and x_t the input the original
layer sees at the same position (x_s == x_t unless the fit is sequential). That
objective depends on the data only through two (in, in) matrices, accumulated
over batches (memory independent of the number of tokens): stats.InputStats.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import dist
from ..errors import InputError
from ..structures.base import StructuredLinear, fitted_modules, linear_weight  # noqa: F401 (fitted_modules re-exported)
from ..ops.stats import InputStats  # noqa: F401 (the fits' statistics; re-exported)
from ..surgery import decoder_layers, layer_index
from ..io.models import model_fingerprint


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(..., in) activations -> (N, in) rows at the real (unpadded) positions."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if mask is None else rows[mask.reshape(-1).bool()]


class _InputCapture:
    """Forward hooks that keep the latest input of each named module (one batch at a time)."""

    def __init__(self, model: nn.Module, names):
        self.inputs: dict[str, torch.Tensor] = {}
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(module, args, output):
            self.inputs[name] = args[0].detach()
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _groups(inputs: dict[str, torch.Tensor]) -> list[list[str]]:
    """Names grouped by the very tensor they were fed (gate_proj and up_proj share one input)."""
    groups: dict[int, list[str]] = {}
    for name, x in inputs.items():
        groups.setdefault(id(x), []).append(name)
    return list(groups.values())


def _model_inputs(batch: dict) -> dict:
    return {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"), "use_cache": False}


def check_pair(student: nn.Module, teacher: nn.Module) -> dict[str, nn.Module]:
    """The student's structured modules; each must exist as a linear layer in the teacher."""
    modules = fitted_modules(student)
    if not modules:
        raise InputError("the student has no structured module with a fit_ method: compress it first")
    teacher_names = dict(teacher.named_modules())
    missing = [n for n in modules if n not in teacher_names]
    if missing:
        raise InputError(f"teacher has no module named {missing[0]!r}: the student must be a compressed "
                         f"copy of the teacher")
    return modules


class _Stop(Exception):
    """Raised by a hook to end a forward pass early (the rest of the model is not needed)."""


def _raise_stop():
    raise _Stop


@torch.no_grad()
def input_stats(model: nn.Module, names, batches, progress: bool = True,
                keep_rows: int = 0) -> dict[str, InputStats]:
    """{name: InputStats} of the inputs each named module of `model` sees on `batches` (modules fed
    the same tensor share one InputStats). One pass of the base model (no LM head), stopped after
    the last decoder layer needed. keep_rows > 0: each InputStats also keeps its first keep_rows
    input rows (float32, real positions, drawn from every batch) in `.rows`, for objectives that need the tokens."""
    batches = list(batches)
    # data-parallel: this rank's share, summed over ranks below (not with keep_rows: every rank keeps
    # the rows a single process would)
    local = batches if keep_rows else dist.shard(batches)
    capture = _InputCapture(model, names)
    prefix, layers = decoder_layers(model)
    indices = [layer_index(n, prefix) for n in names]
    stop = None
    if None not in indices:  # all inside decoder layers: the forward can stop after the last one needed
        stop = layers[max(indices)].register_forward_hook(lambda *_: _raise_stop())
    stats: dict[str, InputStats] = {}
    sampler = torch.Generator().manual_seed(0)
    try:
        for batch in tqdm(local, desc="input statistics", disable=not progress, leave=False):
            capture.inputs.clear()
            try:
                model.base_model(**_model_inputs(batch))
            except _Stop:
                pass
            for group, rows in _accumulate(stats, capture.inputs, batch.get("attention_mask")):
                if keep_rows:  # spread over all batches: about keep_rows / len(batches) from each
                    kept = stats[group[0]].rows if stats[group[0]].rows is not None else rows[:0].float()
                    take = min(-(-keep_rows // len(batches)), keep_rows - len(kept))
                    stats[group[0]].rows = torch.cat([kept, rows[torch.randperm(len(rows), generator=sampler)[:take]].float()])
    finally:
        capture.remove()
        if stop is not None:
            stop.remove()
    if not keep_rows:
        _all_reduce(stats)
    return stats


def _all_reduce(stats: dict) -> None:
    """Sum {name: InputStats} (modules fed one tensor share one) over the ranks, in name order."""
    seen = set()
    for name in sorted(stats):
        if id(stats[name]) not in seen:
            seen.add(id(stats[name]))
            stats[name].all_reduce_()


_SHARED_STATS: dict | None = None


@contextlib.contextmanager
def shared_input_stats():
    """Within this block fit_aware_ gathers, in its first pass, the input statistics of the modules
    of the same kinds (suffixes) in every decoder layer, and reuses them for later fits on the same
    teacher and calibration text: a per-layer scan then runs the calibration pass once, not per point."""
    global _SHARED_STATS
    outer, _SHARED_STATS = _SHARED_STATS, {} if _SHARED_STATS is None else _SHARED_STATS
    try:
        yield
    finally:
        _SHARED_STATS = outer


def batches_digest(batches) -> str:
    h = hashlib.sha256()
    for b in batches:
        for k in ("input_ids", "attention_mask"):
            if b.get(k) is not None:
                h.update(b[k].cpu().numpy().tobytes())
    return h.hexdigest()


def _teacher_stats(teacher: nn.Module, names: list[str], batches, progress: bool) -> dict[str, InputStats]:
    if _SHARED_STATS is None:
        return input_stats(teacher, names, batches, progress)
    prefix, _ = decoder_layers(teacher)
    kinds = {n.rsplit(".", 1)[-1] for n in names}
    # keyed on the weights, never on id(teacher): a new teacher copy (another channel reordering)
    # may reuse a freed object's id
    key = (model_fingerprint(teacher), batches_digest(batches), tuple(sorted(kinds)))
    if key not in _SHARED_STATS:
        every = [n for n, m in teacher.named_modules() if isinstance(m, nn.Linear)
                 and n.rsplit(".", 1)[-1] in kinds and layer_index(n, prefix) is not None]
        _SHARED_STATS[key] = input_stats(teacher, sorted(set(every) | set(names)), batches, progress)
    stats = _SHARED_STATS[key]
    return stats if all(n in stats for n in names) else input_stats(teacher, names, batches, progress)


def _accumulate(stats: dict, inputs: dict, mask) -> list:
    """Add one batch of captured inputs to `stats` ({name: InputStats}, one shared by the modules fed
    the same tensor); returns [(group of names, rows added)]."""
    added = []
    for group in _groups(inputs):
        if group[0] not in stats:
            shared = InputStats.zeros(inputs[group[0]].shape[-1], device=inputs[group[0]].device)
            stats.update({n: shared for n in group})
        rows = _rows(inputs[group[0]], mask)
        stats[group[0]].add_(rows)
        added.append((group, rows))
    return added


@torch.no_grad()
def aware_layer_(layer_s: nn.Module, layer_t: nn.Module, names: list, h_t: list, extra: list, masks: list,
                 ridge: float, sharded: bool = False) -> tuple[list, int]:
    """The aware fit of one decoder layer: the structured modules `names` (relative to the layer) of
    the student's layer fitted to the teacher's layer on the inputs it sees; returns the teacher
    layer's output hidden states and the calibration tokens. The same statistics and solves as
    fit_aware_ (streaming.py feeds it one loaded layer at a time). sharded: h_t is this rank's
    share of the batches (dist.shard); the statistics are summed over ranks before the solves."""
    capture, stats, out = _InputCapture(layer_t, names), {}, []
    try:
        for h, e, mask in zip(h_t, extra, masks):
            capture.inputs.clear()
            out.append(_run_layer(layer_t, h, e))
            _accumulate(stats, capture.inputs, mask)
    finally:
        capture.remove()
    if sharded:
        _all_reduce(stats)
    for name in names:
        layer_s.get_submodule(name).fit_(linear_weight(layer_t.get_submodule(name)), stats[name], ridge)
    return out, (next(iter(stats.values())).n if stats else 0)


@torch.no_grad()
def fit_aware_(student: nn.Module, teacher: nn.Module, batches, ridge: float = 1e-4,
               progress: bool = True) -> dict:
    """Fit every structured module of `student` to its original layer in `teacher`, inputs
    (x_s = x_t) taken from the teacher (shared across fits inside shared_input_stats())."""
    modules = check_pair(student, teacher)
    stats = _teacher_stats(teacher, list(modules), batches, progress)
    for name, module in tqdm(modules.items(), desc="aware fit: solve", disable=not progress, leave=False):
        module.fit_(linear_weight(teacher.get_submodule(name)), stats[name], ridge)
    return {"fit": "aware", "modules": len(modules), "tokens": next(iter(stats.values())).n, "ridge": ridge}


def _decoder_inputs(model: nn.Module, prefix: str, batches, last: int, first: int = 0) -> tuple[list, list]:
    """Per batch, the hidden state entering decoder layer `first`, and per layer (up to `last`) and
    batch the other (args, kwargs) the model passes that layer (masks, rotary embeddings; these
    differ per layer type in some models, e.g. Gemma 3 sliding/global attention)."""
    layers = model.get_submodule(prefix)
    hidden, extra = [], [[] for _ in layers]

    def pre_hook(index):
        def hook(module, args, kwargs):
            if index == first:
                hidden.append(args[0] if args else kwargs["hidden_states"])
            extra[index].append((args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"}))
            if index == last:  # later layers are not needed
                raise _Stop
        return hook

    handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, layer in enumerate(layers)
               if i <= last]
    try:
        for batch in batches:
            try:
                model.base_model(**_model_inputs(batch))
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return hidden, extra


def _run_layer(layer: nn.Module, hidden: torch.Tensor, extra) -> torch.Tensor:
    args, kwargs = extra
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def fit_sequential_(student: nn.Module, teacher: nn.Module, batches, ridge: float = 1e-4,
                    progress: bool = True, refine=None, stages=None) -> dict:
    """Error-compensating fit: decoder layers in forward order; each structured module sees the
    inputs x_s of the already-fitted student and targets W x_t of the teacher at the same
    positions. Within a layer, modules are fitted in forward order, one shared-input group at a
    time. Only one group's statistics are alive at a time.

    refine(SequentialLayer) is called after each layer's closed form, before the student's hidden
    states move on (block reconstruction trains the layer further there); its dicts are collected
    in the result's "layers". stages (stage checkpoints, e.g. reconstruct.LayerCheckpoints):
    stages.load(index, layer, names) gives (tokens, refine's dict) of a layer restored from a
    checkpoint, which is then run but neither fitted nor refined, or None; stages.save(index, layer,
    names, tokens, dict) is called after each layer fitted here.

    Data-parallel (dist.py): without refine, each rank runs its share of the batches and each
    group's statistics are summed over ranks before its solve, so every rank fits the same weights;
    with refine (block reconstruction trains on all token rows) every rank runs all of them."""
    modules = check_pair(student, teacher)
    prefix, layers_t = decoder_layers(teacher)  # (the student's may hold no linear layer any more)
    layers_s = student.get_submodule(prefix)
    outside = [n for n in modules if layer_index(n, prefix) is None]
    if outside:
        raise InputError(f"sequential fit handles modules inside decoder layers only; {outside[0]!r} is "
                         f"outside: use the aware fit", "fit")
    sharded = refine is None
    batches = dist.shard(batches) if sharded else list(batches)
    masks = [b.get("attention_mask") for b in batches]
    indices = [layer_index(n, prefix) for n in modules]
    first, last = min(indices), max(indices)
    # the student equals the teacher up to its first structured module: same inputs to that layer
    h_t, extra = _decoder_inputs(teacher, prefix, batches, last, first)
    h_s = h_t
    tokens, refined = 0, []
    for li in tqdm(range(first, last + 1), desc="sequential fit", disable=not progress, leave=False):
        layer_prefix = f"{prefix}.{li}."
        names = [n[len(layer_prefix):] for n in modules if n.startswith(layer_prefix)]
        loaded = stages.load(li, layers_s[li], names) if stages is not None and names else None
        h_s, h_t, layer_tokens, result = sequential_layer_(li, layers_s[li], layers_t[li], names, h_s, h_t,
                                                           extra[li], masks, ridge, refine, loaded, sharded)
        if stages is not None and names and loaded is None:
            stages.save(li, layers_s[li], names, layer_tokens, result)
        tokens = layer_tokens or tokens
        if result is not None:
            refined.append(result)
    return {"fit": "sequential", "modules": len(modules), "tokens": tokens, "ridge": ridge, "layers": refined}


def sequential_layer_(index: int, layer_s: nn.Module, layer_t: nn.Module, names: list, h_s: list, h_t: list,
                      extra: list, masks: list, ridge: float, refine=None, loaded=None,
                      sharded: bool = False) -> tuple:
    """One decoder layer of the sequential fit: fit the structured modules `names` (relative to the
    layer) of the student's layer, refine it, and run both layers on their hidden states. Returns
    (student hidden states, teacher hidden states) leaving the layer, the calibration tokens (0: no
    module here) and refine's dict (or None). `h_s is h_t` stays true while the student equals the
    teacher. fit_sequential_ calls it for each layer; streaming.py calls it on one loaded layer at a time.
    loaded: (tokens, refine's dict) of a layer whose modules a stage checkpoint restored: only run.
    sharded: the hidden states are this rank's share of the batches (statistics summed over ranks)."""
    unit, x_s, tokens, result = standalone_unit(layer_s, unit_name(names), h_s, extra), None, 0, None
    if loaded is not None:
        tokens, result = loaded
    elif names:
        # Only the smallest module holding the layer's structured modules (the MLP) runs per group:
        # its inputs do not depend on them, so they are captured once.
        x_s = unit_inputs(layer_s, unit, h_s, extra)
        x_t = x_s if h_s is h_t else unit_inputs(layer_t, unit, h_t, extra)
        tokens = _fit_unit(layer_s.get_submodule(unit), layer_t.get_submodule(unit), names, unit,
                           x_s, x_t, extra if not unit else None, masks, ridge, sharded)
    next_t = [_run_layer(layer_t, h, e) for h, e in zip(h_t, extra)]
    if refine is not None and names and loaded is None:
        result = refine(SequentialLayer(index, layer_s, layer_t, names, h_s, h_t, next_t, extra, masks, unit, x_s))
    same = h_s is h_t and not names
    next_s = next_t if same else [_run_layer(layer_s, h, e) for h, e in zip(h_s, extra)]
    return next_s, next_t, tokens, result


@dataclass
class SequentialLayer:
    """One decoder layer during the sequential fit: the student's and teacher's layer, the names
    (relative to the layer) of its structured modules, per batch the hidden states entering it
    (student h_s, teacher h_t), the teacher's output next_t, the layer's other arguments and masks."""

    index: int
    layer_s: nn.Module
    layer_t: nn.Module
    names: list
    h_s: list
    h_t: list
    next_t: list
    extra: list
    masks: list
    unit: str = ""          # the module (relative to the layer) holding all `names`; "" = the layer
    x_s: list | None = None  # per batch the student's input to that unit


def unit_name(names: list[str]) -> str:
    """The smallest module (relative to the decoder layer) holding all `names`; "" = the layer itself."""
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


def standalone_unit(layer: nn.Module, unit: str, hidden: list, extra: list) -> str:
    """`unit` if the layer calls it with its input alone (an MLP), else "" (the whole layer): a unit
    that also takes the mask or the rotary embeddings (attention) cannot run on a captured input."""
    if not unit or not hidden:
        return unit
    seen = {}

    def hook(module, args, kwargs):
        seen["alone"] = len(args) + sum(v is not None for v in kwargs.values()) == 1
        raise _Stop

    handle = layer.get_submodule(unit).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _run_layer(layer, hidden[0], extra[0])
    except _Stop:
        pass
    finally:
        handle.remove()
    return unit if seen.get("alone") else ""


def unit_inputs(layer: nn.Module, unit: str, hidden: list, extra: list) -> list:
    """Per batch the input of `layer`'s submodule `unit` ("" = the layer: its hidden states)."""
    if not unit:
        return hidden
    capture, out = _InputCapture(layer, [unit]), []
    try:
        for h, e in zip(hidden, extra):
            _run_layer(layer, h, e)
            out.append(capture.inputs[unit])
    finally:
        capture.remove()
    return out


def _fit_unit(unit_s, unit_t, names, unit, x_s, x_t, extra, masks, ridge, sharded: bool = False) -> int:
    """Closed-form fits of `names` (relative to the layer) inside one unit, one shared-input group
    at a time in forward order; extra: the layer's other arguments when the unit is the layer."""
    prefix = f"{unit}." if unit else ""
    todo = [n[len(prefix):] for n in names]
    extra = extra if extra is not None else [((), {})] * len(x_s)
    tokens = 0
    while todo:
        stats, group = _first_group_stats(unit_s, unit_t, x_s, x_t, extra, masks, todo)
        if sharded:
            stats.all_reduce_()
        for rel in group:
            unit_s.get_submodule(rel).fit_(linear_weight(unit_t.get_submodule(rel)), stats, ridge)
        todo = [n for n in todo if n not in group]
        tokens = stats.n
    return tokens


def _first_group_stats(layer_s, layer_t, h_s, h_t, extra, masks, todo):
    """InputStats (x_s from the student layer, x_t from the teacher layer) of the first modules
    among `todo` to run in forward order, with the names that share that input."""
    cap_s, cap_t = _InputCapture(layer_s, todo), _InputCapture(layer_t, todo)
    stats, group, pending = None, None, []
    try:
        for hs, ht, e, mask in zip(h_s, h_t, extra, masks):
            cap_s.inputs.clear()
            cap_t.inputs.clear()
            _run_layer(layer_s, hs, e)
            _run_layer(layer_t, ht, e)
            if group is None:
                group = _groups(cap_s.inputs)[0]  # dicts keep insertion order: first to run
                stats = InputStats.zeros(cap_s.inputs[group[0]].shape[-1], shared=False, device=hs.device)
            pending.append((_rows(cap_s.inputs[group[0]], mask), _rows(cap_t.inputs[group[0]], mask)))
            if sum(r.shape[0] for r, _ in pending) >= STATS_ROWS:
                _flush(stats, pending)
        _flush(stats, pending)
    finally:
        cap_s.remove()
        cap_t.remove()
    return stats, group


STATS_ROWS = 8192  # rows per statistics product: one large matmul is several times faster than many small


def _flush(stats: InputStats, pending: list) -> None:
    if pending:
        stats.add_(torch.cat([r for r, _ in pending]), torch.cat([r for _, r in pending]))
        pending.clear()
