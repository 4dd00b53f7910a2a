"""Block reconstruction (`fit="block"`): train each decoder layer's structured modules together,
through the nonlinearity, on cached activations, in forward order.

For each decoder layer holding structured modules (calibrate.fit_sequential_ walks them and
gives the closed-form sequential fit as the starting point), the *unit* is the smallest module
holding all of them (the MLP for MLP targets; the whole decoder layer otherwise, or with
target="layer"). Its inputs come from the already-compressed student; the target is

    target="mlp":   the dense unit on the same inputs        (fit the block's function)
    target="layer": the teacher's decoder-layer output        (attention included; compensates
                                                               upstream error)

and the loss is the relative error weighted by what the next layer sees: each token's error is
divided by the mean square of the teacher's residual stream after the layer (the scale the next
RMSNorm removes), so a massive activation neither hides the other tokens' errors nor its own:

    loss = sum_n w_n ||unit(x_n) - y_n||^2 / sum_n w_n ||y_n||^2,   w_n = 1 / mean(r_n^2)

(1.0 = the unit removed). Adam on the unit's structured weights, the calibration batches split
into train and held-out; the state with the lowest held-out loss is kept, so the result is never
worse on held-out activations than the closed form it starts from. One unit runs forward and
backward at a time. MLP units are trained on shuffled token rows held in memory: inputs, targets
and weights take (2 * hidden + 1) * 4 bytes a token (SmolLM2: 4.6 kB, 0.46 GB per 100k tokens).

Data-parallel (dist.py): every rank runs the sequential pass on all batches; each training chunk's
token rows are split over the ranks and the gradients summed (the loss's denominator is the whole
chunk's target norm, a constant), so every rank takes the single process's step.

Stage checkpoints (checkpoint_dir): each finished layer is saved (LayerCheckpoints), so a killed run
resumes after its last finished layer with the result of an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .closed_form import (SequentialLayer, batches_digest, _rows, _run_layer, fit_sequential_, fitted_modules,
                          unit_inputs)
from .. import dist
from ..errors import InputError, InputFileError
from ..io.models import tensors_fingerprint
from ..io.results import atomic_write

TARGETS = ("mlp", "layer")


@dataclass
class BlockConfig:
    epochs: int = 4
    lr: float = 1e-3
    batch_tokens: int = 1024      # token rows per step (MLP units); layer units step per calibration batch
    target: str = "mlp"           # mlp | layer (see the module docstring)
    held_out: float = 0.1         # share of the calibration batches held out for the error and model choice
    seed: int = 0

    def __post_init__(self):
        if self.target not in TARGETS:
            raise InputError(f"unknown block target {self.target!r}; allowed: {', '.join(TARGETS)}", "block_target")
        if self.epochs < 0 or self.lr <= 0 or self.batch_tokens < 1:
            raise InputError(f"block reconstruction needs epochs >= 0, lr > 0 and batch_tokens >= 1; got "
                             f"{self.epochs}, {self.lr}, {self.batch_tokens}", "block_epochs")


def reconstruct_(student: nn.Module, teacher: nn.Module, batches, cfg: BlockConfig | None = None,
                 ridge: float = 1e-4, progress: bool = True, checkpoint_dir=None, resume: bool = False) -> dict:
    """Sequential closed form, then block reconstruction of every layer; returns per-layer errors.
    checkpoint_dir: each finished layer is saved under its block/ folder; with resume, the layers
    a killed run finished there are loaded instead of fitted (LayerCheckpoints)."""
    cfg = cfg or BlockConfig()
    batches = list(batches)
    bar = tqdm(desc="block reconstruction", unit="layer", disable=not progress)
    stages = LayerCheckpoints(checkpoint_dir, resume, student, teacher, batches, cfg, ridge, bar) \
        if checkpoint_dir else None

    def refine(layer: SequentialLayer) -> dict:
        result = reconstruct_layer_(layer, cfg)
        bar.update(1)
        bar.set_postfix(layer=layer.index, held_before=f"{result['held_before']:.3f}",
                        held_after=f"{result['held_after']:.3f}")
        return result

    start = time.perf_counter()
    try:
        info = fit_sequential_(student, teacher, batches, ridge, progress=False, refine=refine, stages=stages)
    finally:
        bar.close()
    # every rank ran the whole fit (dist.py); rank 0's result on all of them, whatever float noise
    dist.broadcast_([p for m in fitted_modules(student).values() for p in m.parameters()])
    info.update(fit="block", block=vars(cfg).copy(), block_s=time.perf_counter() - start)
    if stages is not None and stages.loaded:
        info["resumed_layers"] = stages.loaded
    return info


class LayerCheckpoints:
    """Stage checkpoints of block reconstruction (fit_sequential_'s `stages`): one file per finished
    decoder layer, <checkpoint_dir>/block/layer_<index>.pt, holding {"identity", "state" (per
    structured module, relative to the layer, its state_dict), "tokens", "result"}. The identity
    covers everything that changes a layer's fit (block settings, ridge, the layer, every structured
    module's type and shapes, the calibration tokens, the teacher's and student's other weights,
    the device), so a file of another run is refused, never reused. Without resume no file is
    read: the old ones are removed and the run writes its own."""

    FORMAT = 1

    def __init__(self, checkpoint_dir, resume: bool, student, teacher, batches, cfg: BlockConfig, ridge: float,
                 bar=None):
        self.folder, self.resume, self.bar, self.loaded = Path(checkpoint_dir) / "block", resume, bar, []
        modules = fitted_modules(student)
        self.identity = {"format": self.FORMAT, "block": vars(cfg).copy(), "ridge": float(ridge),
                         "modules": {n: [type(m).__name__, _shapes(m)] for n, m in modules.items()},
                         "batches": batches_digest(batches), "weights": _weights_digest(student, teacher, modules),
                         "device": next(student.parameters()).device.type}
        if not resume and self.folder.is_dir() and dist.is_main():  # rank 0 writes them (dist.py)
            for old in self.folder.glob("layer_*.pt"):
                old.unlink()

    def path(self, index: int) -> Path:
        return self.folder / f"layer_{index:03d}.pt"

    def load(self, index: int, layer: nn.Module, names: list) -> tuple | None:
        """(tokens, result) of the layer restored from its checkpoint, or None: fit it. Only an
        unbroken run of layers from the first is loaded (later ones saw inputs of another run)."""
        path = self.path(index)
        if not self.resume or not path.is_file():
            self.resume = False
            return None
        record = _read_checkpoint(path)
        other = [k for k, v in {**self.identity, "layer": index}.items() if record["identity"].get(k) != v]
        if other:
            raise InputError(f"block checkpoint {str(path)!r} was made by another run (other {', '.join(other)}); "
                             f"use another checkpoint folder or resume=False", "resume")
        for rel in names:
            layer.get_submodule(rel).load_state_dict(record["state"][rel])
        self.loaded.append(index)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(layer=index, loaded=True)
        return record["tokens"], record["result"]

    def save(self, index: int, layer: nn.Module, names: list, tokens: int, result: dict) -> None:
        state = {rel: {k: v.detach().cpu().clone() for k, v in layer.get_submodule(rel).state_dict().items()}
                 for rel in names}
        _save_checkpoint(self.path(index), {"identity": {**self.identity, "layer": index}, "state": state,
                                        "tokens": tokens, "result": result})


def _shapes(module: nn.Module) -> dict:
    return {k: [list(v.shape), str(v.dtype)] for k, v in module.state_dict().items()}


@torch.no_grad()
def _weights_digest(student: nn.Module, teacher: nn.Module, modules: dict) -> str:
    """sha256 of the teacher's tensors and of the student's outside its structured modules (which
    the fit overwrites): what the layers' inputs and targets are computed with."""
    inside = tuple(f"{n}." for n in modules)
    return tensors_fingerprint([(f"teacher:{n}", t) for n, t in teacher.state_dict().items()] +
                               [(f"student:{n}", t) for n, t in student.state_dict().items()
                                if not n.startswith(inside)], full=True)


def _read_checkpoint(path: Path) -> dict:
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: pickle, zip and torch errors alike
        raise InputFileError(f"block checkpoint {str(path)!r} is damaged ({type(e).__name__}); delete it to fit that "
                         f"layer again, or use another checkpoint folder", "resume") from None
    if not isinstance(record, dict) or not isinstance(record.get("identity"), dict):
        raise InputError(f"block checkpoint {str(path)!r} is not a bcllm block checkpoint; use another "
                         f"checkpoint folder or resume=False", "resume")
    return record


def _save_checkpoint(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(record, tmp))


def reconstruct_layer_(layer: SequentialLayer, cfg: BlockConfig) -> dict:
    """Train the structured modules of one decoder layer; returns its held-out errors and time."""
    start = time.perf_counter()
    name = "" if cfg.target == "layer" else layer.unit
    unit_s = layer.layer_s.get_submodule(name) if name else layer.layer_s
    params = [p for rel in layer.names for n, p in layer.layer_s.get_submodule(rel).named_parameters()
              if n != "bias"]
    n_held = max(1, int(len(layer.h_s) * cfg.held_out)) if len(layer.h_s) > 1 else 0
    data = _unit_data(layer, name)
    train, held = (data[:len(data) - n_held], data[len(data) - n_held:]) if n_held else (data, data)
    if name:  # a per-token unit: train on shuffled token rows
        train = _token_rows(train, cfg.batch_tokens, cfg.seed + layer.index)
    with torch.enable_grad():
        result = _train(unit_s, params, train, held, cfg, layer.index)
    result.update(layer=layer.index, unit=name or "decoder layer", seconds=time.perf_counter() - start,
                  tokens=sum(int(d["w"].numel()) for d in data))
    return result


def _unit_data(layer: SequentialLayer, name: str) -> list[dict]:
    """Per calibration batch: the unit's input ("x": the student's, with the layer's other
    arguments for a whole-layer unit), its target "y" and the token weights "w" (real positions)."""
    data = []
    unit_t = layer.layer_t.get_submodule(name) if name else None
    x_units = layer.x_s if name == layer.unit else unit_inputs(layer.layer_s, name, layer.h_s, layer.extra)
    for h_s, x_unit, e, mask, out_t in zip(layer.h_s, x_units, layer.extra, layer.masks, layer.next_t):
        w = 1 / out_t.pow(2).mean(-1).clamp_min(1e-12)
        if not name:
            data.append({"x": (h_s, e), "y": out_t, "w": w if mask is None else w * mask})
            continue
        x = _rows(x_unit, mask)
        data.append({"x": x, "y": unit_t(x), "w": _rows(w[..., None], mask)[:, 0]})
    return data


def _token_rows(data: list[dict], batch_tokens: int, seed: int) -> list[dict]:
    """All rows of the per-batch data shuffled once and cut into chunks of batch_tokens."""
    x, y, w = (torch.cat([d[k] for d in data]) for k in ("x", "y", "w"))
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    return [{"x": x[i], "y": y[i], "w": w[i]} for i in order.split(batch_tokens)]


def _loss_terms(unit: nn.Module, chunk: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted squared error, weighted squared target) of one chunk: the loss is their ratio."""
    if isinstance(chunk["x"], tuple):
        out = _run_layer(unit, *chunk["x"])
    else:
        out = unit(chunk["x"])
    w = chunk["w"].to(out.dtype)
    return (w[..., None] * (out - chunk["y"]) ** 2).sum(), _target_norm(chunk)


def _target_norm(chunk: dict) -> torch.Tensor:
    """sum w ||y||^2 of one chunk: the loss's denominator (the targets', so no forward is needed)."""
    return (chunk["w"].to(chunk["y"].dtype)[..., None] * chunk["y"] ** 2).sum()


def _split(chunks: list[dict]) -> bool:
    """Whether the chunks' rows are split over ranks: token rows (an MLP unit) under torchrun; the
    calibration batches of a whole-layer unit are not."""
    return dist.world() > 1 and bool(chunks) and not isinstance(chunks[0]["x"], tuple)


def _share(chunk: dict, split: bool) -> dict:
    """This rank's token rows of a chunk (possibly none) where split, else the whole chunk."""
    return dist.split_rows(chunk, rows_of="w") if split else chunk


@torch.no_grad()
def relative_error(unit: nn.Module, chunks: list[dict]) -> float:
    """sum w ||unit(x) - y||^2 / sum w ||y||^2 over chunks (1.0 = the unit removed); token rows
    split over ranks and the sums added (_split)."""
    split = _split(chunks)
    err = ref = 0.0
    for chunk in chunks:
        part = _share(chunk, split)
        if part["w"].numel():
            e, r = _loss_terms(unit, part)
            err, ref = err + float(e), ref + float(r)
    if split:
        err, ref = dist.all_reduce_sum(torch.tensor([err, ref], dtype=torch.float64)).tolist()
    return err / max(ref, 1e-30)


def _schedule_factor(step: int, total: int) -> float:
    """Cosine decay of the learning rate from 1 to 0 over `total` steps."""
    return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def _train(unit: nn.Module, params: list, train: list[dict], held: list[dict], cfg: BlockConfig, index: int) -> dict:
    """Adam over `params` with a cosine schedule; keeps the parameters of the lowest held-out error."""
    for p in params:
        p.requires_grad_(True)
    best = relative_error(unit, held)
    result = {"held_before": best, "train_before": relative_error(unit, train), "epochs_run": 0}
    state = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    total = max(1, cfg.epochs * len(train))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: _schedule_factor(step, total))
    g = torch.Generator().manual_seed(cfg.seed * 7919 + index)
    split = _split(train)  # data-parallel: each rank its share of every chunk's rows, gradients summed
    result["train_rows"] = sum(_share(c, split)["w"].shape[0] for c in train)
    try:
        for epoch in range(cfg.epochs):
            for i in torch.randperm(len(train), generator=g).tolist():
                part = _share(train[i], split)
                # the denominator is the whole chunk's (the targets', constant): each rank's share of
                # the loss is its rows' error over it, and the shares' gradients add up to the whole's
                ref = _target_norm(train[i])
                opt.zero_grad(set_to_none=True)
                if part["w"].numel():
                    (_loss_terms(unit, part)[0] / ref.clamp_min(1e-30)).backward()
                dist.sum_gradients_(params)
                opt.step()
                sched.step()
            held_error = relative_error(unit, held)
            if held_error < best:
                best, state = held_error, [p.detach().clone() for p in params]
                result["epochs_run"] = epoch + 1
    finally:
        with torch.no_grad():
            for p, value in zip(params, state):
                p.copy_(value)
                p.requires_grad_(False)
    result.update(held_after=best, train_after=relative_error(unit, train))
    return result
