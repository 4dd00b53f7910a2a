"""Logit distillation of the structured parameters (DESIGN.md section 2).

Minimise KL(teacher || student) over every real position of the calibration batches, plus an
optional hidden-state MSE at the output of each decoder layer that holds a structured module.
Only the structured modules' weights train (with train_norms: also their biases and every norm
weight). AdamW, linear warm-up then cosine decay, gradient clipping.

The teacher's logits are cached once per run as top-k values + log-sum-exp: the KL is taken over
the teacher's top-k tokens plus one "rest of the vocabulary" bucket, which is exact up to how the
student spreads the rest (a lower bound of the full KL). Held-out KL is the full-vocabulary KL.
A checkpoint (trainable tensors, optimiser, schedule, history) is written every
`checkpoint_every` steps; with `resume` a run continues from it and ends in the same state as an
uninterrupted run (batch order is a function of the step and seed).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .calibrate import fitted_modules
from .surgery import decoder_layers, layer_index


@dataclass
class DistillConfig:
    steps: int = 100
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.05          # fraction of steps with a linear warm-up
    clip: float = 1.0             # gradient norm clip
    topk: int = 64                # teacher logits kept per position
    hidden_mse: float = 0.0       # weight of the per-layer hidden-state MSE (0: off)
    train_norms: bool = False     # also train the structured modules' biases and all norm weights
    eval_every: int = 10          # held-out KL every this many steps
    checkpoint_every: int = 10
    seed: int = 0


def trainable_parameters(student, train_norms: bool = False) -> dict[str, torch.nn.Parameter]:
    """{name: parameter} that distillation trains: the structured modules' weights (not biases),
    plus with train_norms their biases and the weights of every normalisation layer."""
    names = {}
    for mname, module in fitted_modules(student).items():
        for pname, p in module.named_parameters():
            if train_norms or pname != "bias":
                names[f"{mname}.{pname}"] = p
    if train_norms:
        for mname, module in student.named_modules():
            if "norm" in type(module).__name__.lower():
                names.update({f"{mname}.{pname}": p for pname, p in module.named_parameters()})
    return names


def _masked(batch) -> torch.Tensor:
    mask = batch.get("attention_mask")
    return torch.ones_like(batch["input_ids"], dtype=torch.bool) if mask is None else mask.bool()


@torch.no_grad()
def teacher_targets(teacher, batches, topk: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per batch: top-k logits, their token ids and the log-sum-exp, at the real positions."""
    out = []
    for batch in batches:
        z = teacher(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False).logits
        z = z[_masked(batch)].float()
        values, ids = z.topk(topk, dim=-1)
        out.append((values, ids, z.logsumexp(-1)))
    return out


def topk_kl(z_s: torch.Tensor, target) -> torch.Tensor:
    """Mean over rows of KL(teacher || student) on the teacher's top-k tokens plus one tail bucket."""
    values, ids, lse = target
    logp_t = values - lse[:, None]
    logq = torch.log_softmax(z_s.float(), dim=-1)
    logq_s = logq.gather(1, ids)
    p_t = logp_t.exp()
    tail_t = (1 - p_t.sum(-1)).clamp_min(1e-12)
    tail_s = (1 - logq_s.exp().sum(-1)).clamp_min(1e-12)
    kl = (p_t * (logp_t - logq_s)).sum(-1) + tail_t * (tail_t.log() - tail_s.log())
    return kl.mean()


@torch.no_grad()
def held_out_kl(student, teacher_logprobs: list[torch.Tensor], batches) -> float:
    """Full-vocabulary KL(teacher || student) per position, averaged over all real positions."""
    total, count = 0.0, 0
    for lp_t, batch in zip(teacher_logprobs, batches):
        z = student(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False).logits
        lq = torch.log_softmax(z[_masked(batch)].float(), -1)
        total += (lp_t.exp() * (lp_t - lq)).sum().item()
        count += lp_t.shape[0]
    return total / max(count, 1)


def _schedule(cfg: DistillConfig):
    warm = max(1, int(cfg.warmup * cfg.steps))

    def factor(step):  # step counts from 0
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.steps - warm)))
    return factor


def _batch_index(step: int, n: int, seed: int) -> int:
    """Batches in a fresh random order every epoch; a pure function of the step (resumable)."""
    epoch, pos = divmod(step, n)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return int(torch.randperm(n, generator=g)[pos])


def distill_(student, teacher, batches, held_out=(), cfg: DistillConfig | None = None, checkpoint_dir=None,
             resume: bool = False, progress: bool = True, on_step=None) -> dict:
    """Train the student's structured parameters toward the teacher; returns the history.

    on_step(step, loss) is called after every step (a caller may raise to stop: the last
    checkpoint then lets `resume=True` continue)."""
    cfg = cfg or DistillConfig()
    if cfg.steps < 1:
        raise ValueError(f"distillation steps must be >= 1, got {cfg.steps}")
    if not batches:
        raise ValueError("distillation needs calibration batches")
    params = trainable_parameters(student, cfg.train_norms)
    if not params:
        raise ValueError("the student has no structured module to distil: compress it first")
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
    history = {"loss": [], "held_out_kl": []}
    step = 0

    ckpt = Path(checkpoint_dir) / "distill_state.pt" if checkpoint_dir else None
    if resume and ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        if state["config"] != asdict(cfg) or sorted(state["params"]) != sorted(params):
            raise ValueError(f"checkpoint {str(ckpt)!r} was made with other distillation settings or modules; "
                             f"use another checkpoint folder or drop --resume")
        with torch.no_grad():
            for name, value in state["params"].items():
                params[name].copy_(value)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history, step = state["history"], state["step"]

    targets = teacher_targets(teacher, batches, cfg.topk)
    held = list(held_out)
    held_lp = [torch.log_softmax(t, -1) for t in _teacher_logits(teacher, held)]
    prefix, _ = decoder_layers(teacher)
    hidden_layers = sorted({layer_index(n, prefix) for n in fitted_modules(student)} - {None})

    def save():
        if ckpt is None:
            return
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_name(f".{ckpt.name}.tmp{os.getpid()}")
        torch.save({"config": asdict(cfg), "step": step, "history": history, "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "params": {n: p.detach().clone() for n, p in params.items()}}, tmp)
        os.replace(tmp, ckpt)

    student.train(False)  # no dropout: the student should match the teacher's eval-mode function
    bar = tqdm(total=cfg.steps, initial=step, desc="distill", disable=not progress)
    try:
        while step < cfg.steps:
            i = _batch_index(step, len(batches), cfg.seed)
            batch, mask = batches[i], _masked(batches[i])
            with torch.enable_grad():
                out = student(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                              use_cache=False, output_hidden_states=cfg.hidden_mse > 0)
                loss = topk_kl(out.logits[mask], targets[i])
                if cfg.hidden_mse > 0:
                    loss = loss + cfg.hidden_mse * _hidden_mse(teacher, batch, mask, out.hidden_states, hidden_layers)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.clip)
            opt.step()
            sched.step()
            step += 1
            history["loss"].append(loss.item())
            if held and (step % cfg.eval_every == 0 or step == cfg.steps):
                history["held_out_kl"].append((step, held_out_kl(student, held_lp, held)))
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", **({"held_kl": f"{history['held_out_kl'][-1][1]:.4f}"}
                                                          if history["held_out_kl"] else {}))
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save()
            if on_step is not None:
                on_step(step, loss.item())
    finally:
        bar.close()
        for p in params.values():
            p.requires_grad_(False)
    return {"steps": step, "trainable_params": sum(p.numel() for p in params.values()),
            "trainable": list(params), "final_loss": history["loss"][-1] if history["loss"] else None,
            "held_out_kl": history["held_out_kl"], "loss": history["loss"], "config": asdict(cfg)}


@torch.no_grad()
def _teacher_logits(teacher, batches) -> list[torch.Tensor]:
    return [teacher(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"), use_cache=False)
            .logits[_masked(b)].float() for b in batches]


def _hidden_mse(teacher, batch, mask, student_hidden, layers) -> torch.Tensor:
    """Mean over patched layers of ||h_s - h_t||^2 / ||h_t||^2 at the layer outputs (real positions)."""
    with torch.no_grad():
        teacher_hidden = teacher(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                 use_cache=False, output_hidden_states=True).hidden_states
    terms = [((student_hidden[li + 1][mask] - teacher_hidden[li + 1][mask]) ** 2).sum()
             / (teacher_hidden[li + 1][mask] ** 2).sum().clamp_min(1e-12) for li in layers]
    return torch.stack(terms).mean()
