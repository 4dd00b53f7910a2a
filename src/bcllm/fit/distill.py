"""Logit distillation of the structured parameters (DESIGN.md section 2).

Minimise KL(teacher || student) over every real position of the calibration batches, plus an
optional hidden-state MSE at the output of each decoder layer that holds a structured module.
Only the structured modules' weights train (with train_norms: also their biases and every norm
weight; with adapter_rank r: also a rank-r correction B A of every dense linear in the decoder
layers from the first structured one on, merged into its weight when distillation ends, so the
student keeps its parameter count and speed: the recovery LoRA of SliceGPT and LLM-Pruner).
AdamW, linear warm-up then cosine decay, gradient clipping.

The teacher's logits are cached once per run as top-k values + log-sum-exp: the KL is taken over
the teacher's top-k tokens plus one "rest of the vocabulary" bucket, which is exact up to how the
student spreads the rest (a lower bound of the full KL). Held-out KL is the full-vocabulary KL.
The decoder layers before the first trained one are the teacher's own: their output is cached
once per batch with the targets and the student starts from it (cache_prefix). bf16 runs the
student's forward under bfloat16 autocast (the circulant products stay float32).
A checkpoint (trainable tensors, optimiser, schedule, history) is written every
`checkpoint_every` steps; with `resume` a run continues from it and ends in the same state as an
uninterrupted run (batch order is a function of the step and seed).

Data-parallel under torchrun (dist.py): every step's batch is split by rows over the ranks; each
rank's loss is its share of the whole batch's (its positions' sum over the batch's positions), so
the gradients summed over ranks, the clipped step and the loss are those of one process on the
whole batch. The held-out KL is split the same way; on-policy batches are rank 0's.
"""

from __future__ import annotations

import hashlib
import math
import platform
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import dist
from ..errors import InputError, InputFileError
from ..io.models import tensors_fingerprint
from ..io.results import atomic_write
from .closed_form import batches_digest, fitted_modules
from ..surgery import decoder_layers, layer_index, set_module


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
    cache_prefix: bool = True     # run the frozen layers before the first trained one once, not every step
    bf16: bool = False            # student forward under bfloat16 autocast (CPUs with AMX: ~3x faster matmuls)
    vocab: str = "full"           # full | teacher: the loss over the tokens in the teacher's top-k anywhere in the batch
    divergence: str = "forward"   # forward (top-k + tail, cached) | reverse | jsd | skew: full-vocabulary, teacher per step
    onpolicy: float = 0.0         # share of steps on the student's own continuations (on_policy batches), teacher-scored
    adapter_rank: int = 0         # rank of the merged corrections of the dense linears after the first structured layer


ADAPTERS = "bcllm_adapters"  # a student's attribute: {linear name: (A, B)} merged into its weights (saved)


class Adapter(nn.Module):
    """A frozen dense linear plus a trained low-rank correction: y = base(x) + x A^T B^T. B starts
    at zero (the student starts unchanged); A is seeded, scaled so x A^T keeps x's size."""

    def __init__(self, base: nn.Linear, rank: int, generator: torch.Generator):
        super().__init__()
        w = base.weight
        self.base = base
        a = torch.randn(rank, w.shape[1], generator=generator, dtype=torch.float32) / math.sqrt(w.shape[1])
        self.lora_a = nn.Parameter(a.to(device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device, dtype=w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + nn.functional.linear(nn.functional.linear(x, self.lora_a), self.lora_b)


@torch.no_grad()
def merge_factors_(linear: nn.Linear, a: torch.Tensor, b: torch.Tensor) -> None:
    """weight += B A: an adapter folded into its linear (after distillation, and when a saved student
    is loaded: the same operation, so the loaded weights are the trained ones)."""
    linear.weight += (b @ a).to(linear.weight.dtype)


def add_adapters_(student, rank: int, seed: int = 0) -> list[str]:
    """Wrap every dense nn.Linear of the decoder layers from the first one holding a structured module
    on (not inside a structured module) in an Adapter of `rank`; returns the wrapped modules' names."""
    prefix, _ = decoder_layers(student)
    structured = tuple(f"{n}." for n in fitted_modules(student))
    first = min((i for n in structured if (i := layer_index(n, prefix)) is not None), default=0)
    generator = torch.Generator().manual_seed(seed)
    names = [n for n, m in student.named_modules() if type(m) is nn.Linear and not f"{n}.".startswith(structured)
             and (layer_index(n, prefix) if layer_index(n, prefix) is not None else -1) >= first]
    for name in names:
        set_module(student, name, Adapter(student.get_submodule(name), rank, generator))
    return names


def merge_adapters_(student) -> None:
    """Fold every Adapter back into its linear and record its factors in the student's ADAPTERS
    (a second distillation's factors are stacked on the first's: B1 A1 + B2 A2 = [B1 B2] [A1; A2]),
    which save_fitted writes instead of the whole changed weights."""
    names = [n for n, m in student.named_modules() if isinstance(m, Adapter)]
    record = getattr(student, ADAPTERS, {})
    for name in names:
        adapter = student.get_submodule(name)
        a, b = adapter.lora_a.detach().clone(), adapter.lora_b.detach().clone()
        merge_factors_(adapter.base, a, b)
        set_module(student, name, adapter.base)
        if name in record:
            a, b = torch.cat([record[name][0].to(a), a]), torch.cat([record[name][1].to(b), b], dim=1)
        record[name] = (a, b)
    if names:
        setattr(student, ADAPTERS, record)


def trainable_parameters(student, train_norms: bool = False) -> dict[str, torch.nn.Parameter]:
    """{name: parameter} that distillation trains: the structured modules' weights (not biases),
    plus with train_norms their biases and the weights of every normalisation layer, plus the
    factors of any Adapter (add_adapters_)."""
    names = {}
    for mname, module in fitted_modules(student).items():
        for pname, p in module.named_parameters():
            if train_norms or pname != "bias":
                names[f"{mname}.{pname}"] = p
    if train_norms:
        for mname, module in student.named_modules():
            if "norm" in type(module).__name__.lower():
                names.update({f"{mname}.{pname}": p for pname, p in module.named_parameters()})
    for mname, module in student.named_modules():
        if isinstance(module, Adapter):
            names.update({f"{mname}.lora_a": module.lora_a, f"{mname}.lora_b": module.lora_b})
    return names


def _masked(batch) -> torch.Tensor:
    mask = batch.get("attention_mask")
    return torch.ones_like(batch["input_ids"], dtype=torch.bool) if mask is None else mask.bool()


@torch.no_grad()
def teacher_targets(teacher, batches, topk: int, first: int = 0, restrict: bool = False) -> list[dict]:
    """Per batch, computed once: the teacher's top-k logits, their token ids and the log-sum-exp at
    the real positions ("target"), and with first > 0 the hidden state entering decoder layer
    `first` ("prefix"; the student equals the teacher before it, so it need not run there).

    restrict (vocab="teacher"): the batch's vocabulary is the union of the teacher's top-k tokens
    over its positions (over every rank's rows: a rank without rows only joins the union), "vocab"
    its token ids; the target's ids are positions in it and its log-sum-exp is over it, so the loss
    is the exact top-k + tail KL of both distributions restricted to that vocabulary."""
    layer = decoder_layers(teacher)[1][first]
    seen = {}

    def grab(module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]

    def shape(module, args, output):
        seen["tuple"] = isinstance(output, tuple)

    handles = [layer.register_forward_pre_hook(grab, with_kwargs=True), layer.register_forward_hook(shape)]
    out = []
    try:
        for batch in batches:
            if not _rows(batch):  # (a rank without rows of a short batch)
                out.append({"target": None, "vocab": batch_vocabulary(teacher, None) if restrict else None})
                continue
            z = teacher(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False).logits
            z = z[_masked(batch)].float()
            values, ids = z.topk(topk, dim=-1)
            target, vocab = (values, ids, z.logsumexp(-1)), None
            if restrict:
                vocab = batch_vocabulary(teacher, ids)
                position = torch.full((z.shape[-1],), -1, dtype=torch.long, device=ids.device)
                position[vocab] = torch.arange(vocab.numel(), device=ids.device)
                target = (values, position[ids], z[:, vocab].logsumexp(-1))
            out.append({"target": target, "vocab": vocab, "prefix": seen["hidden"] if first else None,
                        "tuple": seen["tuple"]})
    finally:
        for h in handles:
            h.remove()
    return out


class _Skip(nn.Module):
    """Stands in for a frozen decoder layer before the first trained one: passes its input on."""

    def __init__(self, as_tuple: bool):
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.as_tuple else hidden_states


@contextmanager
def cached_prefix(student, first: int, as_tuple: bool):
    """While active, decoder layers before `first` are skipped and layer `first` reads the hidden
    state put in the yielded dict's "hidden" (the cached teacher prefix of the current batch)."""
    layers = decoder_layers(student)[1]
    state = {"hidden": None}
    if first == 0:
        yield state
        return

    def feed(module, args, kwargs):
        if args:
            return (state["hidden"], *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": state["hidden"]}

    originals = [layers[i] for i in range(first)]
    for i in range(first):
        layers[i] = _Skip(as_tuple)
    handle = layers[first].register_forward_pre_hook(feed, with_kwargs=True)
    try:
        yield state
    finally:
        handle.remove()
        for i, layer in enumerate(originals):
            layers[i] = layer


class _SubsetHead(nn.Module):
    """The output layer restricted to the rows `ids` (logits of those tokens only)."""

    def __init__(self, head: nn.Module, ids: torch.Tensor):
        super().__init__()
        self.head, self.ids = head, ids

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        bias = self.head.bias[self.ids] if getattr(self.head, "bias", None) is not None else None
        return nn.functional.linear(hidden, self.head.weight[self.ids], bias)


@contextmanager
def restricted_head(student, ids):
    """While active (ids not None), the student's logits are those of the tokens `ids` only."""
    if ids is None:
        yield
        return
    head = student.get_output_embeddings()
    student.set_output_embeddings(_SubsetHead(head, ids))
    try:
        yield
    finally:
        student.set_output_embeddings(head)


def batch_vocabulary(teacher, ids: torch.Tensor | None) -> torch.Tensor:
    """The sorted token ids in `ids` (this rank's top-k ids of a batch; None: no rows here), united
    over every rank's (all ranks call it for the same batch at the same step)."""
    if dist.world() == 1:
        return torch.unique(ids)
    head = teacher.get_output_embeddings().weight
    present = torch.zeros(head.shape[0], device=head.device)
    if ids is not None:
        present[ids.reshape(-1)] = 1
    return dist.all_reduce_sum(present).nonzero()[:, 0]


def first_trained_layer(student, params: dict, enabled: bool = True) -> int:
    """Index of the first decoder layer holding a trained parameter (0 when any trained parameter
    lies outside the decoder layers, or caching is off)."""
    prefix, _ = decoder_layers(student)
    indices = [layer_index(n, prefix) for n in params]
    return 0 if not enabled or None in indices else min(indices)


def topk_kl(z_s: torch.Tensor, target) -> torch.Tensor:
    """Mean over rows of KL(teacher || student) on the teacher's top-k tokens plus one tail bucket."""
    return topk_kl_rows(z_s, target).mean()


def topk_kl_rows(z_s: torch.Tensor, target) -> torch.Tensor:
    """Per row, KL(teacher || student) on the teacher's top-k tokens plus one tail bucket."""
    values, ids, lse = target
    logp_t = values - lse[:, None]
    logq = torch.log_softmax(z_s.float(), dim=-1)
    logq_s = logq.gather(1, ids)
    p_t = logp_t.exp()
    tail_t = (1 - p_t.sum(-1)).clamp_min(1e-12)
    tail_s = (1 - logq_s.exp().sum(-1)).clamp_min(1e-12)
    return (p_t * (logp_t - logq_s)).sum(-1) + tail_t * (tail_t.log() - tail_s.log())


DIVERGENCES = ("forward", "reverse", "jsd", "skew")
SKEW = 0.1  # skew KL: KL(p || SKEW p + (1 - SKEW) q), DistiLLM's default


def divergence(z_t: torch.Tensor, z_s: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean over rows of a divergence between teacher logits z_t and student logits z_s (full
    vocabulary): forward KL(p||q), reverse KL(q||p), jsd (generalised JSD at beta 0.5, GKD) or skew
    (KL(p || a p + (1-a) q), DistiLLM)."""
    return divergence_rows(z_t, z_s, kind).mean()


def divergence_rows(z_t: torch.Tensor, z_s: torch.Tensor, kind: str) -> torch.Tensor:
    """Per row, the divergence of `divergence`."""
    logp = torch.log_softmax(z_t.float(), -1)
    logq = torch.log_softmax(z_s.float(), -1)
    p, q = logp.exp(), logq.exp()
    if kind == "forward":
        return (p * (logp - logq)).sum(-1)
    if kind == "reverse":
        return (q * (logq - logp)).sum(-1)
    if kind == "jsd":
        logm = torch.logaddexp(logp, logq) - math.log(2)
        return 0.5 * ((p * (logp - logm)).sum(-1) + (q * (logq - logm)).sum(-1))
    if kind == "skew":
        logm = torch.logaddexp(logp + math.log(SKEW), logq + math.log(1 - SKEW))
        return (p * (logp - logm)).sum(-1)
    raise InputError(f"unknown divergence {kind!r}; allowed: {', '.join(DIVERGENCES)}", "distill_divergence")


@torch.no_grad()
def held_out_kl(student, teacher_logprobs: list[torch.Tensor], batches) -> float:
    """Full-vocabulary KL(teacher || student) per position, averaged over all real positions (of
    every rank's rows: dist.split_rows)."""
    total, count = 0.0, 0
    for lp_t, batch in zip(teacher_logprobs, batches):
        z = student(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False).logits
        lq = torch.log_softmax(z[_masked(batch)].float(), -1)
        total += (lp_t.exp() * (lp_t - lq)).sum().item()
        count += lp_t.shape[0]
    if dist.world() > 1:
        total, count = dist.all_reduce_sum(torch.tensor([total, count], dtype=torch.float64)).tolist()
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
             resume: bool = False, progress: bool = True, on_step=None, on_policy=None, on_eval=None) -> dict:
    """Train the student's structured parameters toward the teacher; returns the history.

    on_step(step, loss) is called after every step (a caller may raise to stop: the last
    checkpoint then lets `resume=True` continue). on_policy(): a fresh batch of the student's own
    continuations, used for cfg.onpolicy of the steps. on_eval(step) -> dict: extra figures
    recorded at every held-out evaluation (e.g. agreement on held-out prompts: the curve)."""
    cfg = cfg or DistillConfig()
    _check(cfg, batches)
    if cfg.bf16 and next(student.parameters()).device.type == "cpu" and not cpu_has_bf16():
        warnings.warn("bcllm: distill_bf16 on a CPU without bfloat16 instructions (no AVX512-BF16 or AMX): "
                      "autocast emulates them, measured 15x slower than float32 on a 2-core AVX2 EPYC; "
                      "leave it off here", RuntimeWarning, stacklevel=2)
    if cfg.adapter_rank and fitted_modules(student):
        add_adapters_(student, cfg.adapter_rank, cfg.seed)
    try:
        return _distill(student, teacher, batches, held_out, cfg, checkpoint_dir, resume, progress, on_step,
                        on_policy, on_eval)
    finally:  # the student leaves as plain linears again (also when stopped: a resumed run re-adds them)
        merge_adapters_(student)


def _distill(student, teacher, batches, held_out, cfg, checkpoint_dir, resume, progress, on_step, on_policy,
             on_eval) -> dict:
    params = _start(student, batches, cfg)
    run = _Run(cfg, params, checkpoint_dir, start_identity(params, batches))
    if resume:
        run.load()
    first = first_trained_layer(student, params, cfg.cache_prefix and not cfg.train_norms)
    if cfg.onpolicy and on_policy is None:
        raise InputError("onpolicy distillation needs a source of the student's own continuations", "distill_onpolicy")
    local = [dist.split_rows(b) for b in batches]  # this rank's rows of every batch (all of them alone)
    targets = _LazyTargets(teacher, local, cfg.topk, first, cfg.vocab == "teacher")
    held_out = list(held_out)  # every rank's (the same): whether to evaluate; held: this rank's rows of it
    held = [b for b in map(dist.split_rows, held_out) if _rows(b)]
    held_lp = [torch.log_softmax(t, -1) for t in _teacher_logits(teacher, held)]
    prefix, _ = decoder_layers(teacher)
    hidden_layers = sorted({layer_index(n, prefix) for n in fitted_modules(student)} - {None})
    student.train(False)  # no dropout: the student should match the teacher's eval-mode function
    if held_out and run.step == 0:  # where distillation starts from (every rank: held_out_kl sums over ranks)
        _evaluate(student, run, held, held_lp, on_eval)
    bar = tqdm(total=cfg.steps, initial=run.step, desc="distill", unit="step", disable=not progress)
    start, tokens = time.perf_counter(), 0
    try:
        while run.step < cfg.steps:
            loss, n = _next_step(student, teacher, batches, local, targets, first, run, hidden_layers, on_policy)
            tokens += n
            run.history["tokens"] = run.history.get("tokens", 0) + n
            if held_out and (run.step % cfg.eval_every == 0 or run.step == cfg.steps):
                _evaluate(student, run, held, held_lp, on_eval)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}",
                            **({"held_kl": f"{run.history['held_out_kl'][-1][1]:.4f}"}
                               if run.history["held_out_kl"] else {}))
            if run.step % cfg.checkpoint_every == 0 or run.step == cfg.steps:
                run.save()
            if on_step is not None:
                on_step(run.step, loss)
    finally:
        bar.close()
        for p in params.values():
            p.requires_grad_(False)
    elapsed = time.perf_counter() - start
    return {"steps": run.step, "trainable_params": sum(p.numel() for p in params.values()),
            "trainable": list(params), "final_loss": run.history["loss"][-1] if run.history["loss"] else None,
            "adapted": [n.removesuffix(".lora_a") + ".weight" for n in params if n.endswith(".lora_a")],
            "held_out_kl": run.history["held_out_kl"], "loss": run.history["loss"], "config": asdict(cfg),
            "tokens_per_s": tokens / elapsed if elapsed > 0 else None, "prefix_layers_cached": first,
            "vocab_size": targets.mean_vocabulary(), "curve": run.history.get("curve", []),
            "distill_tokens": run.history.get("tokens", 0), "teacher_batches": len(targets.done)}


def _rows(batch: dict) -> int:
    return batch["input_ids"].shape[0]


def _next_step(student, teacher, batches, local, targets, first, run, hidden_layers, on_policy):
    """The step run.step: on the student's own text (on-policy) or on its calibration batch, of which
    this rank trains its rows `local[i]`; returns (loss, real positions of the whole batch)."""
    if on_policy_step(run.step, run.cfg.onpolicy):  # the student's own text, the teacher scoring it now
        batch = on_policy() if dist.is_main() else None
        if dist.world() > 1:  # rank 0's on every rank, sent from the CPU (CUDA tensors unpickle on cuda:0)
            batch = dist.broadcast_object(None if batch is None else _moved(batch, "cpu"))
        batch = _moved(batch, next(student.parameters()).device)  # (this rank's GPU, not rank 0's)
        n = int(_masked(batch).sum())
        return _step(student, teacher, dist.split_rows(batch), None, run, hidden_layers, n), n
    i = _batch_index(run.step, len(batches), run.cfg.seed)
    n = int(_masked(batches[i]).sum())
    target = targets[i]  # (computed at the batch's first draw, on every rank: the vocabulary's union is collective)
    if not _rows(local[i]):  # no rows here (a short batch): this rank only adds its zero gradients
        return _step(student, teacher, local[i], None, run, hidden_layers, n), n
    with cached_prefix(student, first, target["tuple"]) as state, restricted_head(student, target["vocab"]):
        state["hidden"] = target["prefix"]
        return _step(student, teacher, local[i], target["target"], run, hidden_layers, n), n


def _moved(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def on_policy_step(step: int, share: float) -> bool:
    """Whether step (from 0) is on-policy: exactly floor(n * share) of the first n steps are."""
    return math.floor((step + 1) * share) > math.floor(step * share)


def _evaluate(student, run, held, held_lp, on_eval) -> None:
    """Held-out KL on calibration text at this step, and on_eval's figures (the curve) beside it."""
    run.history["held_out_kl"].append((run.step, held_out_kl(student, held_lp, held)))
    if on_eval is not None:
        run.history.setdefault("curve", []).append({"step": run.step, "tokens": run.history.get("tokens", 0),
                                                    **on_eval(run.step)})


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bfloat16 in hardware: on x86 Linux the avx512_bf16 or amx_bf16
    flag (oneDNN's own check also says yes on AVX-512 without them, where it emulates); elsewhere
    oneDNN's check."""
    if cpuinfo is None and platform.system() == "Linux" and platform.machine().lower() in ("x86_64", "amd64"):
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            pass
    if cpuinfo is not None:
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
        return "avx512_bf16" in flags or "amx_bf16" in flags
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # another torch build: assume it does, warn about nothing
        return True


def _check(cfg: DistillConfig, batches) -> None:
    """Refuse settings distillation cannot run with, before anything is changed."""
    if cfg.adapter_rank < 0:
        raise InputError(f"adapter_rank must be >= 0, got {cfg.adapter_rank}", "adapter_rank")
    if cfg.steps < 1:
        raise InputError(f"distillation steps must be >= 1, got {cfg.steps}", "distill_steps")
    if cfg.divergence not in DIVERGENCES:
        raise InputError(f"unknown divergence {cfg.divergence!r}; allowed: {', '.join(DIVERGENCES)}",
                         "distill_divergence")
    if not 0 <= cfg.onpolicy < 1:
        raise InputError(f"onpolicy is a share of the steps, 0 <= x < 1; got {cfg.onpolicy}", "distill_onpolicy")
    if cfg.vocab == "teacher" and (cfg.divergence != "forward" or cfg.onpolicy):
        raise InputError("distill_vocab teacher restricts the cached forward-KL targets: use it with divergence "
                         "forward and no on-policy steps", "distill_vocab")
    if cfg.vocab not in ("full", "teacher"):
        raise InputError(f"unknown distillation vocab {cfg.vocab!r}; allowed: full, teacher", "distill_vocab")
    if not batches:
        raise InputError("distillation needs calibration batches")


def _start(student, batches, cfg: DistillConfig) -> dict:
    """Leave only the trained parameters requiring gradients; return them."""
    params = trainable_parameters(student, cfg.train_norms)
    if not params:
        raise InputError("the student has no structured module to distil: compress it first")
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    return params


def _step(student, teacher, batch, target, run, hidden_layers, total: int) -> float:
    """One optimiser step on `batch` (this rank's rows of a batch with `total` real positions over
    all ranks; dist.split_rows); returns the loss of the whole batch."""
    run.opt.zero_grad(set_to_none=True)
    with torch.enable_grad():
        loss = _share_of_loss(student, teacher, batch, target, run.cfg, hidden_layers, total)
        if _rows(batch):  # (a rank without rows has no graph: its gradients are zeros, dist.sum_gradients_)
            loss.backward()
    dist.sum_gradients_(list(run.params.values()))
    torch.nn.utils.clip_grad_norm_(list(run.params.values()), run.cfg.clip)
    run.opt.step()
    run.sched.step()
    run.step += 1
    value = loss.item() if dist.world() == 1 else dist.all_reduce_sum(loss.detach().double().reshape(1)).item()
    run.history["loss"].append(value)
    return value


def _share_of_loss(student, teacher, batch, target, cfg: DistillConfig, hidden_layers, total: int) -> torch.Tensor:
    """The loss on this rank's rows, weighted by their share of the batch's `total` real positions:
    summed over ranks, the loss (and its gradient) of the whole batch. The weight is exactly 1 alone."""
    mask = _masked(batch)
    if not mask.shape[0]:  # no rows here: still takes part in the hidden-state denominators' sum
        if cfg.hidden_mse > 0:
            dist.all_reduce_sum(torch.zeros(len(hidden_layers), dtype=torch.float64, device=mask.device))
        return torch.zeros((), device=mask.device)
    with torch.autocast(mask.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        out = student(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                      use_cache=False, output_hidden_states=cfg.hidden_mse > 0)
    if target is None or cfg.divergence != "forward":  # the teacher's full logits, this step
        with torch.no_grad():
            z_t = teacher(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                          use_cache=False).logits[mask]
        rows = divergence_rows(z_t, out.logits[mask], cfg.divergence)
    else:
        rows = topk_kl_rows(out.logits[mask], target)
    # (alone: exactly the mean; with ranks the sum, which a share of padding alone leaves 0, not NaN)
    loss = rows.mean() * (rows.shape[0] / total) if dist.world() == 1 else rows.sum() / total
    if cfg.hidden_mse > 0:
        loss = loss + cfg.hidden_mse * _hidden_mse(teacher, batch, mask, out.hidden_states, hidden_layers)
    return loss


class _LazyTargets:
    """teacher_targets of batch i, computed on first use and kept (top-k: about 0.8 kB a token): a long
    run over fresh data pays the teacher once per batch it uses, never for batches it does not reach."""

    def __init__(self, teacher, batches, topk: int, first: int, restrict: bool = False):
        self.teacher, self.batches, self.topk, self.first, self.restrict = teacher, batches, topk, first, restrict
        self.done: dict[int, dict] = {}

    def __getitem__(self, i: int) -> dict:
        if i not in self.done:
            self.done[i] = teacher_targets(self.teacher, [self.batches[i]], self.topk, self.first, self.restrict)[0]
        return self.done[i]

    def mean_vocabulary(self) -> float | None:
        """vocab="teacher": the mean size of the batches' vocabularies so far (None: the full vocabulary)."""
        sizes = [t["vocab"].numel() for t in self.done.values() if t.get("vocab") is not None]
        return sum(sizes) / len(sizes) if sizes else None


@torch.no_grad()
def start_identity(params: dict, batches) -> str:
    """sha256 of the trainable tensors a distillation starts from and of its calibration batches'
    tokens: a checkpoint resumes only the run that wrote it."""
    weights = tensors_fingerprint(sorted(params.items()), full=True)
    return hashlib.sha256(f"{weights}:{batches_digest(batches)}".encode()).hexdigest()


class _Run:
    """The optimiser state of one distillation: parameters, AdamW, schedule, step, history, and
    its checkpoint file (written atomically; `load` continues an interrupted run)."""

    def __init__(self, cfg: DistillConfig, params: dict, checkpoint_dir, identity: str | None = None):
        self.cfg, self.params, self.identity = cfg, params, identity
        self.opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _schedule(cfg))
        self.history = {"loss": [], "held_out_kl": []}
        self.step = 0
        self.path = Path(checkpoint_dir) / "distill_state.pt" if checkpoint_dir else None

    def load(self) -> None:
        if self.path is None or not self.path.is_file():
            return
        try:
            state = torch.load(self.path, weights_only=False)
        except Exception as e:  # a truncated or overwritten file: pickle, zip and torch errors alike
            raise InputFileError(f"distillation checkpoint {str(self.path)!r} is damaged ({type(e).__name__}); "
                                 f"delete it to start over, or use another checkpoint folder", "resume") from None
        self._check(state)
        with torch.no_grad():
            for name, value in state["params"].items():
                self.params[name].copy_(value)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.history, self.step = state["history"], state["step"]

    def _check(self, state: dict) -> None:
        """Refuse a checkpoint of another run: other settings, modules or shapes, or (checkpoints
        written since identities exist) another starting student or other calibration batches."""
        other = None
        # settings added since a checkpoint was written had their defaults' behaviour then
        then, now = {**asdict(DistillConfig()), **state["config"]}, asdict(self.cfg)
        if then != now:
            other = "other distillation settings: " + ", ".join(
                f"{k} {then.get(k)!r} there, {now.get(k)!r} here" for k in sorted({*then, *now})
                if then.get(k) != now.get(k))
        elif sorted(state["params"]) != sorted(self.params) or \
                any(v.shape != self.params[n].shape for n, v in state["params"].items()):
            other = "other modules or module sizes"
        elif state.get("identity") is not None and self.identity is not None and state["identity"] != self.identity:
            other = "another starting student (fit, calibration or structure settings) or other calibration batches"
        if other:
            raise InputError(f"checkpoint {str(self.path)!r} was made by another run ({other}); use another "
                             f"checkpoint folder or resume=False", "resume")

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {"config": asdict(self.cfg), "step": self.step, "history": self.history,
                 "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                 "params": {n: p.detach().clone() for n, p in self.params.items()}, "identity": self.identity}
        atomic_write(self.path, lambda tmp: torch.save(state, tmp))


@torch.no_grad()
def _teacher_logits(teacher, batches) -> list[torch.Tensor]:
    return [teacher(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"), use_cache=False)
            .logits[_masked(b)].float() for b in batches]


def _hidden_mse(teacher, batch, mask, student_hidden, layers) -> torch.Tensor:
    """Mean over patched layers of ||h_s - h_t||^2 / ||h_t||^2 at the layer outputs (real positions);
    ||h_t||^2 summed over every rank's rows, so the terms of the ranks add up to the whole batch's."""
    with torch.no_grad():
        teacher_hidden = teacher(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                 use_cache=False, output_hidden_states=True).hidden_states
        scale = torch.stack([(teacher_hidden[li + 1][mask] ** 2).sum() for li in layers])
        # summed over ranks in float64 (as a rank without rows sends it; cast back exactly alone)
        scale = dist.all_reduce_sum(scale.double()).to(scale.dtype)
    # With a cached prefix the skipped layers (_Skip) record no hidden state: the student's list is
    # shorter by their number; its entry 0 is the input to the first layer that runs (the fed prefix),
    # then each layer's output in order.
    skipped = len(teacher_hidden) - len(student_hidden)
    terms = [((student_hidden[li + 1 - skipped][mask] - teacher_hidden[li + 1][mask]) ** 2).sum()
             / scale[k].clamp_min(1e-12) for k, li in enumerate(layers)]
    return torch.stack(terms).mean()
