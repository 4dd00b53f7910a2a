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
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .closed_form import SequentialLayer, _rows, _run_layer, fit_sequential_, unit_inputs
from ..errors import InputError

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
                 ridge: float = 1e-4, progress: bool = True) -> dict:
    """Sequential closed form, then block reconstruction of every layer; returns per-layer errors."""
    cfg = cfg or BlockConfig()
    bar = tqdm(desc="block reconstruction", unit="layer", disable=not progress)

    def refine(layer: SequentialLayer) -> dict:
        result = reconstruct_layer_(layer, cfg)
        bar.update(1)
        bar.set_postfix(layer=layer.index, held_before=f"{result['held_before']:.3f}",
                        held_after=f"{result['held_after']:.3f}")
        return result

    start = time.perf_counter()
    try:
        info = fit_sequential_(student, teacher, batches, ridge, progress=False, refine=refine)
    finally:
        bar.close()
    info.update(fit="block", block=vars(cfg).copy(), block_s=time.perf_counter() - start)
    return info


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
    return (w[..., None] * (out - chunk["y"]) ** 2).sum(), (w[..., None] * chunk["y"] ** 2).sum()


@torch.no_grad()
def relative_error(unit: nn.Module, chunks: list[dict]) -> float:
    """sum w ||unit(x) - y||^2 / sum w ||y||^2 over chunks (1.0 = the unit removed)."""
    err = ref = 0.0
    for chunk in chunks:
        e, r = _loss_terms(unit, chunk)
        err, ref = err + float(e), ref + float(r)
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
    try:
        for epoch in range(cfg.epochs):
            for i in torch.randperm(len(train), generator=g).tolist():
                err, ref = _loss_terms(unit, train[i])
                opt.zero_grad(set_to_none=True)
                (err / ref.clamp_min(1e-30)).backward()
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
