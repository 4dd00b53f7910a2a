"""Fidelity of a compressed model (student) against the original (teacher): docs/DESIGN.md section 3.

Both models run teacher-forced on the same token ids; every position of every
prompt counts (micro-average over tokens, natural log), and each also greedily
continues every prompt by N tokens. The teacher runs once: its logits stream
into one float32 .npy memmap and its continuations into meta.json under
models.cache_dir()/teacher/<key>, so a sweep compares many students with one
teacher without holding two models, and a large teacher never needs the
full-vocab logits of all positions in RAM at once.

    teacher = TeacherCache.build(model, tokenizer, prompts)
    result = evaluate(student, tokenizer, prompts, teacher=teacher)
    result["metrics"]["token_agreement"], result["ci"]["kl_mean"], result["per_prompt"][0]
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import dist
from ..errors import InputError, InputFileError
from ..surgery import set_module
from ..io.models import cache_dir, model_file_identity, model_fingerprint  # noqa: F401 (re-exported)
from ..io.prompts import context_length, tokenize_prompts
from ..io.results import atomic_write, library_versions, remove_dead_temporaries, set_aside

CACHE_FORMAT = 2  # bump when the cache layout or what it holds changes
METRIC_KEYS = ("token_agreement", "last_token_agreement", "top5_overlap", "kl_mean", "logit_l2_mean",
               "logit_cosine_mean", "generation_agreement", "ppl_teacher", "ppl_student")
CHUNK = 512  # positions per metric step: bounds the float64 (positions, vocab) temporaries


# ---- metrics on logits z of shape (positions, vocab): one value per position ----

def top1_agreement(z_t: torch.Tensor, z_s: torch.Tensor) -> torch.Tensor:
    return (z_t.argmax(-1) == z_s.argmax(-1)).double()


def topk_overlap(z_t: torch.Tensor, z_s: torch.Tensor, k: int = 5) -> torch.Tensor:
    """|topk(z_t) ∩ topk(z_s)| / k."""
    k = min(k, z_t.shape[-1])
    a, b = z_t.topk(k, dim=-1).indices, z_s.topk(k, dim=-1).indices
    return (a[:, :, None] == b[:, None, :]).any(-1).sum(-1).double() / k


def kl_divergence(z_t: torch.Tensor, z_s: torch.Tensor) -> torch.Tensor:
    """KL(softmax z_t || softmax z_s), in float64 so that tiny differences do not vanish in rounding."""
    log_t, log_s = z_t.double().log_softmax(-1), z_s.double().log_softmax(-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1)


def logit_l2(z_t: torch.Tensor, z_s: torch.Tensor) -> torch.Tensor:
    return (z_t.double() - z_s.double()).norm(dim=-1)


def logit_cosine(z_t: torch.Tensor, z_s: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(z_t.double(), z_s.double(), dim=-1)


def token_nll(z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(z)[target] per position; z[p] predicts targets[p] (the next token)."""
    return F.cross_entropy(z.double(), targets, reduction="none")


def common_prefix_length(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@torch.inference_mode()
def prompt_stats(z_t, z_s, ids: torch.Tensor, gen_t, gen_s) -> dict:
    """Sums (and max) over the positions of one prompt; `summarize` turns them into micro-averages."""
    n = z_t.shape[0]
    s = dict(n=n, agree=0.0, top5=0.0, kl=0.0, kl_max=0.0, l2=0.0, cos=0.0, nll_t=0.0, nll_s=0.0,
             n_nll=n - 1, gen_prefix=common_prefix_length(gen_t, gen_s))
    for a in range(0, n, CHUNK):
        zt, zs = z_t[a:a + CHUNK], z_s[a:a + CHUNK]
        agree = top1_agreement(zt, zs)
        kl = kl_divergence(zt, zs)
        s["agree"] += agree.sum().item()
        s["top5"] += topk_overlap(zt, zs).sum().item()
        s["kl"] += kl.sum().item()
        s["kl_max"] = max(s["kl_max"], kl.max().item())
        s["l2"] += logit_l2(zt, zs).sum().item()
        s["cos"] += logit_cosine(zt, zs).sum().item()
        targets = ids[a + 1:a + CHUNK + 1]  # the last position has no next token in the prompt
        s["nll_t"] += token_nll(zt[:len(targets)], targets).sum().item()
        s["nll_s"] += token_nll(zs[:len(targets)], targets).sum().item()
    s["last_agree"] = agree[-1].item()
    return s


def bootstrap_ci(numerators, denominators, resamples: int = 1000, level: float = 0.95, seed: int = 0):
    """Percentile interval of sum(num)/sum(den) when prompts are resampled with replacement."""
    num, den = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num), size=(resamples, len(num)))
    stats = num[idx].sum(1) / den[idx].sum(1)
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def _ppl(nll_sum: float, count: int):
    return math.exp(nll_sum / count) if count else None  # None: no prompt has two tokens


def summarize(stats: list[dict], max_new_tokens: int, resamples: int = 1000, seed: int = 0):
    """(metrics, ci, per-prompt values) from per-prompt sums; metrics are micro-averages over positions."""
    def total(k):
        return sum(s[k] for s in stats)

    n = total("n")
    gen = [s["gen_prefix"] / max_new_tokens for s in stats] if max_new_tokens else None
    metrics = {
        "token_agreement": total("agree") / n,
        "last_token_agreement": total("last_agree") / len(stats),
        "top5_overlap": total("top5") / n,
        "kl_mean": total("kl") / n,
        "logit_l2_mean": total("l2") / n,
        "logit_cosine_mean": total("cos") / n,
        "generation_agreement": sum(gen) / len(gen) if gen else None,
        "ppl_teacher": _ppl(total("nll_t"), total("n_nll")),
        "ppl_student": _ppl(total("nll_s"), total("n_nll")),
        "kl_max": max(s["kl_max"] for s in stats),
    }
    counts = [s["n"] for s in stats]
    ci = {"level": 0.95, "resamples": resamples,
          "token_agreement": bootstrap_ci([s["agree"] for s in stats], counts, resamples, seed=seed),
          "kl_mean": bootstrap_ci([s["kl"] for s in stats], counts, resamples, seed=seed)}
    per_prompt = [{
        "n_tokens": s["n"],
        "token_agreement": s["agree"] / s["n"],
        "last_token_agreement": s["last_agree"],
        "top5_overlap": s["top5"] / s["n"],
        "kl_mean": s["kl"] / s["n"],
        "kl_max": s["kl_max"],
        "logit_l2_mean": s["l2"] / s["n"],
        "logit_cosine_mean": s["cos"] / s["n"],
        "generation_agreement": gen[i] if gen else None,
        "ppl_teacher": _ppl(s["nll_t"], s["n_nll"]),
        "ppl_student": _ppl(s["nll_s"], s["n_nll"]),
    } for i, s in enumerate(stats)]
    return metrics, ci, per_prompt


# ---- running a model: teacher-forced logits (unpadded) and greedy continuations (left-padded) ----

def length_batches(token_ids: list[list[int]], max_batch: int = 32, max_batch_tokens: int = 2048) -> list[list[int]]:
    """Prompt indices sorted by length and cut into batches of at most max_batch prompts and
    max_batch_tokens padded tokens (sorting keeps the padding small)."""
    order = sorted(range(len(token_ids)), key=lambda i: (len(token_ids[i]), i))
    batches: list[list[int]] = []
    for i in order:
        last = batches[-1] if batches else []
        if last and len(last) < max_batch and (len(last) + 1) * len(token_ids[i]) <= max_batch_tokens:
            last.append(i)
        else:
            batches.append([i])
    return batches


def eos_token_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id} if getattr(tokenizer, "eos_token_id", None) is not None else set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else ({gen_eos} if gen_eos is not None else set())
    return sorted(ids)


@torch.inference_mode()
def greedy_generate(model, token_ids: list[list[int]], max_new_tokens: int, eos_ids=()) -> torch.Tensor:
    """(B, N) greedy continuations, batched with left padding (the attention mask and the position
    ids that transformers derives from it make padding exact up to float rounding). A sequence that
    emits an end token keeps emitting it, so two models that stop at the same step fully agree."""
    eos_ids = list(eos_ids)
    fill = eos_ids[0] if eos_ids else 0
    longest = max(len(t) for t in token_ids)
    device = model_device(model)
    x = torch.zeros((len(token_ids), longest), dtype=torch.long, device=device)  # 0: any valid id, masked
    mask = torch.zeros_like(x)
    for j, t in enumerate(token_ids):
        x[j, longest - len(t):] = torch.tensor(t)
        mask[j, longest - len(t):] = 1
    new = torch.full((len(token_ids), max_new_tokens), fill, dtype=torch.long)
    if max_new_tokens == 0:
        return new
    out = model.generate(input_ids=x, attention_mask=mask, do_sample=False, num_beams=1,
                         max_new_tokens=max_new_tokens, eos_token_id=eos_ids or None, pad_token_id=0)
    for j, row in enumerate(out[:, longest:].cpu().tolist()):
        stop = next((k + 1 for k, t in enumerate(row) if t in eos_ids), len(row))
        new[j, :stop] = torch.tensor(row[:stop])
    return new


def length_groups(token_ids: list[list[int]]) -> list[list[int]]:
    """Indices of the prompts of equal length, grouped in first-seen order: each group runs unpadded."""
    by_length: dict[int, list[int]] = {}
    for j, t in enumerate(token_ids):
        by_length.setdefault(len(t), []).append(j)
    return list(by_length.values())


@torch.inference_mode()
def run_batch(model, token_ids: list[list[int]], max_new_tokens: int, eos_ids=()):
    """([(L_i, V) float32 logits at every position of prompt i], (B, N) greedy continuations).

    The teacher-forced logits run prompts of equal length together, unpadded, so they are exactly
    what a single-prompt forward computes (up to float rounding), for any architecture.
    """
    device = model_device(model)
    logits: list = [None] * len(token_ids)
    for rows in length_groups(token_ids):
        z = model(input_ids=torch.tensor([token_ids[j] for j in rows], device=device), use_cache=False).logits
        for k, j in enumerate(rows):
            logits[j] = z[k].float()
    return logits, greedy_generate(model, token_ids, max_new_tokens, eos_ids)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


# ---- the teacher cache ----

@dataclass
class TeacherCache:
    """The teacher's outputs on a prompt set: full-vocab logits of every position (float32 memmap,
    rows in prompt order) and greedy continuations. Build with `TeacherCache.build`."""

    path: Path
    token_ids: list[list[int]]
    generations: list[list[int]]
    settings: dict
    computed: bool = False  # True when this run computed the outputs, False when read from an earlier run
    _logits: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self):
        self.offsets = np.cumsum([0] + [len(t) for t in self.token_ids]).tolist()  # row of each prompt

    def logits(self, i: int) -> torch.Tensor:
        """(length, vocab) float32 logits of prompt i, read from disk."""
        if self._logits is None:
            self._logits = np.load(self.path / "logits.npy", mmap_mode="r")
        a = self.offsets[i]
        return torch.from_numpy(np.array(self._logits[a:a + len(self.token_ids[i])]))

    @classmethod
    def load(cls, path) -> "TeacherCache":
        path = Path(path)
        cache, problem = cls._open(path)
        if problem:
            raise InputFileError(f"teacher cache {str(path)!r} is damaged ({problem}); delete it and it is "
                                 f"computed again")
        return cache

    @classmethod
    def _open(cls, path: Path) -> tuple["TeacherCache | None", str | None]:
        """(the cache, None), or (None, what is wrong with the folder): meta.json unreadable or of
        another format, or logits.npy missing or not one row per prompt token (cut short)."""
        try:
            meta = json.loads((path / "meta.json").read_text())
            if meta.get("format") != CACHE_FORMAT:
                return None, f"format {meta.get('format')}, this bcllm reads {CACHE_FORMAT}"
            rows = sum(len(t) for t in meta["token_ids"])
            if len(meta["generations"]) != len(meta["token_ids"]):
                return None, "meta.json has a generation count unlike its prompt count"
            shape = np.load(path / "logits.npy", mmap_mode="r").shape
            if shape[0] != rows:
                return None, f"logits.npy has {shape[0]} rows, the prompts {rows} tokens"
            return cls(path, meta["token_ids"], meta["generations"], meta["settings"]), None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return None, f"{type(e).__name__}: {e}"

    @classmethod
    def build(cls, model, tokenizer, prompts: list[str], *, max_new_tokens: int = 32, chat: bool = False,
              model_id: str | None = None, root=None, max_batch: int = 32, max_batch_tokens: int = 2048,
              progress: bool = True) -> "TeacherCache":
        """Load the cache for this model, prompts and settings, or compute and write it.

        model_id names the model's source for the key (the CLI passes the spec and its files'
        identity); the key also covers a fingerprint of the weights, the token ids, the settings,
        dtype and device type. The cache is written to a temporary folder and renamed into place,
        so an interrupted run leaves no cache rather than a corrupt one.
        """
        if max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        context = context_length(model)
        max_length = None if context is None else context - max_new_tokens
        if max_length is not None and max_length < 1:
            raise InputError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model "
                             f"context of {context} tokens")
        token_ids = tokenize_prompts(tokenizer, prompts, max_length, chat)
        param = next(model.parameters())
        settings = dict(max_new_tokens=max_new_tokens, chat=chat, max_length=max_length, max_batch=max_batch,
                        max_batch_tokens=max_batch_tokens, eos_ids=eos_token_ids(model, tokenizer),
                        dtype=str(param.dtype), device=param.device.type)
        key_material = json.dumps({"format": CACHE_FORMAT, "model_id": model_id,
                                   "name_or_path": getattr(model.config, "name_or_path", ""),
                                   "weights": model_fingerprint(model, full=True), "settings": settings,
                                   "versions": library_versions(),
                                   "attention": getattr(model.config, "_attn_implementation", None),
                                   "token_ids": token_ids}, sort_keys=True)
        key = hashlib.sha256(key_material.encode()).hexdigest()[:24]
        root = Path(root) if root is not None else cache_dir() / "teacher"
        with dist.main_first():  # under torchrun rank 0 computes it, the other ranks read it
            return cls._load_or_compute(root, key, model, token_ids, settings, progress)

    @classmethod
    def _load_or_compute(cls, root: Path, key: str, model, token_ids, settings: dict, progress: bool):
        path = root / key
        if path.exists():
            cache, problem = cls._open(path)
            if cache is not None:
                return cache
            set_aside(path, "teacher cache", problem, "computed again")
        root.mkdir(parents=True, exist_ok=True)
        remove_dead_temporaries(root, ".*.tmp*")
        tmp = root / f".{key}.tmp{os.getpid()}"
        try:
            _compute_teacher(model, token_ids, settings, tmp, progress)
            try:
                os.replace(tmp, path)  # atomic: the cache appears whole or not at all
            except OSError:
                if not (path / "meta.json").is_file():  # else another run finished the same cache first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        cache = cls.load(path)
        cache.computed = True
        return cache


def _compute_teacher(model, token_ids, settings, folder: Path, progress: bool) -> None:
    from numpy.lib.format import open_memmap

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    offsets = np.cumsum([0] + [len(t) for t in token_ids]).tolist()
    generations: list = [None] * len(token_ids)
    rows = None
    bar = tqdm(total=len(token_ids), desc="teacher", unit="prompt", disable=not progress)
    for batch in length_batches(token_ids, settings["max_batch"], settings["max_batch_tokens"]):
        logits, new = run_batch(model, [token_ids[i] for i in batch], settings["max_new_tokens"],
                                settings["eos_ids"])
        if rows is None:  # the vocab size is known once the model has run
            rows = open_memmap(folder / "logits.npy", mode="w+", dtype=np.float32,
                               shape=(offsets[-1], logits[0].shape[-1]))
        for j, i in enumerate(batch):
            rows[offsets[i]:offsets[i + 1]] = logits[j].cpu().numpy()
            generations[i] = new[j].tolist()
        bar.update(len(batch))
    bar.close()
    rows.flush()
    del rows
    meta = {"format": CACHE_FORMAT, "settings": settings, "token_ids": token_ids, "generations": generations}
    atomic_write(folder / "meta.json", json.dumps(meta), every_rank=True)  # read back at once


# ---- evaluation ----

def evaluate(student, tokenizer, prompts: list[str], teacher, *, progress: bool = True, seed: int = 0,
             resamples: int = 1000, generate: bool = True) -> dict:
    """Fidelity of `student` against a TeacherCache built on the same prompts (and tokenizer).

    Returns {"metrics": {METRIC_KEYS..., "kl_max"}, "ci": {"token_agreement": [lo, hi],
    "kl_mean": [lo, hi], ...}, "per_prompt": [...], "num_prompts", "num_positions", ...}.
    """
    if not isinstance(teacher, TeacherCache):
        raise InputError(f"teacher must be a TeacherCache (TeacherCache.build(model, tokenizer, prompts)), "
                        f"got {type(teacher).__name__}")
    settings = teacher.settings
    with warnings.catch_warnings():  # the truncation warning was already given when the teacher was built
        warnings.simplefilter("ignore")
        token_ids = tokenize_prompts(tokenizer, prompts, settings["max_length"], settings["chat"])
    if token_ids != teacher.token_ids:
        raise InputError("the teacher cache was built on other prompts (or another tokenizer or chat setting)")
    device = model_device(student)
    n_new = settings["max_new_tokens"] if generate else 0  # generate=False: teacher-forced metrics only
    stats: list = [None] * len(token_ids)
    student_gen: list = [None] * len(token_ids)
    bar = tqdm(total=len(token_ids), desc="student", unit="prompt", disable=not progress)
    for batch in length_batches(token_ids, settings["max_batch"], settings["max_batch_tokens"]):
        logits, new = run_batch(student, [token_ids[i] for i in batch], n_new, settings["eos_ids"])
        for j, i in enumerate(batch):
            student_gen[i] = new[j].tolist()
            stats[i] = prompt_stats(teacher.logits(i).to(device), logits[j], torch.tensor(token_ids[i], device=device),
                                    teacher.generations[i], student_gen[i])
        bar.update(len(batch))
    bar.close()
    metrics, ci, per_prompt = summarize(stats, n_new, resamples, seed)
    for i, row in enumerate(per_prompt):
        row["prompt"] = prompts[i]
        row["teacher_generation"] = tokenizer.decode(teacher.generations[i])
        row["student_generation"] = tokenizer.decode(student_gen[i])
    return {"metrics": metrics, "ci": ci, "per_prompt": per_prompt, "num_prompts": len(token_ids),
            "num_positions": sum(len(t) for t in token_ids), "max_new_tokens": n_new,
            "teacher_cache": str(teacher.path)}


# ---- the floor: the same modules removed ----

class ZeroLinear(nn.Module):
    """A removed linear layer: outputs zeros (no bias, no parameters)."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


FLOOR_KEYS = ("floor_token_agreement", "floor_kl_mean", "kl_recovered")


def floor_model(model, modules: list[str]):
    """A copy of `model` with `modules` (dense or structured) removed: each outputs zero."""
    import copy

    floor = copy.deepcopy(model)
    for name in modules:
        set_module(floor, name, ZeroLinear(floor.get_submodule(name).out_features))
    return floor


def measure_floor(model, modules: list[str], tokenizer, prompts: list[str], teacher) -> dict:
    """Teacher-forced token agreement and KL of the model with `modules` removed: the zero-parameter
    baseline a structure must lift the model above (docs/DESIGN.md section 3)."""
    result = evaluate(floor_model(model, modules), tokenizer, prompts, teacher, progress=False, generate=False,
                      resamples=10)
    return {"floor_token_agreement": result["metrics"]["token_agreement"],
            "floor_kl_mean": result["metrics"]["kl_mean"]}


def with_floor(metrics: dict, floor: dict) -> dict:
    """metrics plus the floor's figures and kl_recovered = 1 - kl_student / kl_floor."""
    recovered = 1 - metrics["kl_mean"] / floor["floor_kl_mean"] if floor["floor_kl_mean"] > 0 else None
    return {**metrics, **floor, "kl_recovered": recovered}
