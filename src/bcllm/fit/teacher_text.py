"""Teacher-written calibration text at scale: the teacher's replies to broad seed instructions.

Published recovery distils on the teacher's own text (LLM-QAT, BitDistiller, self-data
distillation): it looks like what the model is asked, it is what the model says, and there is
as much of it as time allows. The bundled seeds (data/seed_instructions.txt, made by
scripts/make_seeds.py: questions, writing tasks, lists, messages, code in a dozen languages,
story openings, arithmetic, rewrites and multi-turn follow-ups "turn ||| follow-up") go through
the chat template; a model without one continues each seed as an opening. A sample is plain
text, the seed then the reply (then the follow-up and its reply), like the prompts users send.

Generation is the lean loop batched: prompts sorted by token length and left-padded into
batches of 64 (an attention mask and per-row positions; rows equal HF generate's, tested), one
static KV cache for every batch, eager (on this 2-core CPU a compiled step was slower at batch
64). Most batches sample (temperature, top-p within the top 64 tokens), a `greedy_share` of them
are greedy. Batches are appended to a partial file as they finish, so an interrupted run
resumes; the finished set is cached by model fingerprint, settings and seeds, and the set for
the embedded default model ships with bcllm (data/teacher_text/) so the first run need not write it.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import InputError
from ..io.models import cache_dir, cache_kwargs, model_fingerprint, static_cache
from ..io.results import atomic_write, read_cached_json

SEEDS_FILE = Path(__file__).resolve().parents[1] / "data" / "seed_instructions.txt"
# Text already written for the embedded default model, under the cache file's own name (key included),
# so a fresh clone's first recipe does not spend ~25 minutes writing it; used only when the key matches.
BUNDLED = Path(__file__).resolve().parents[1] / "data" / "teacher_text"
TURN = " ||| "  # separates a seed's first turn from its follow-up


@dataclass(frozen=True)
class TeacherText:
    """How the teacher's text is written; every field is part of the cache key."""

    rounds: int = 1                 # passes over the seeds, each reply sampled afresh
    greedy_share: float = 0.25      # round 0: this share of the batches is greedy, the rest sampled
    max_new_tokens: int = 96        # per reply
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 64                 # top-p is taken within the top_k most likely tokens
    batch_size: int = 64            # 278 tokens/s here (eager, sdpa), against 145 at 32
    seed: int = 0


def load_seeds(path=None) -> list[str]:
    path = Path(path) if path else SEEDS_FILE
    seeds = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not seeds:
        raise InputError(f"seed file {str(path)!r} has no seeds", "calib")
    return seeds


def _prompt_ids(tokenizer, turns: list[str], replies: list[str]) -> list[int]:
    """Token ids that ask the model for its next reply after `turns` (user) and `replies` (its own)."""
    if getattr(tokenizer, "chat_template", None):
        chat = []
        for i, turn in enumerate(turns):
            chat.append({"role": "user", "content": turn})
            if i < len(replies):
                chat.append({"role": "assistant", "content": replies[i]})
        return list(tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False))
    text = "\n".join(t for pair in zip(turns, replies + [""]) for t in pair if t).strip()
    return tokenizer(text)["input_ids"]


def right_padded(rows: list[list[int]], pad: int, device="cpu") -> dict:
    """One batch {input_ids, attention_mask} of token id rows, padded on the right to the longest."""
    width = max(len(r) for r in rows)
    return {"input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)}


def end_tokens(model, tokenizer) -> set[int]:
    """Ids that end a reply: the tokenizer's end token and the model's generation config's (a list
    for chat models whose turn ends with its own token), never the unknown token."""
    ids = [tokenizer.eos_token_id]
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += config_eos if isinstance(config_eos, (list, tuple)) else [config_eos]
    if getattr(tokenizer, "chat_template", None) and "<|im_end|>" in tokenizer.get_vocab():
        ids.append(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return {t for t in ids if isinstance(t, int) and t >= 0 and t != tokenizer.unk_token_id}


def _pick(logits: torch.Tensor, cfg: TeacherText, greedy: bool, gen: torch.Generator) -> torch.Tensor:
    """Next tokens (B, 1): argmax, or a top-p sample within the top_k most likely tokens."""
    if greedy:
        return logits.argmax(-1, keepdim=True)
    values, ids = (logits.float().cpu() / cfg.temperature).topk(cfg.top_k, dim=-1)  # the seeded CPU generator
    probs = values.softmax(-1)
    keep = probs.cumsum(-1) - probs < cfg.top_p  # the smallest prefix holding top_p of the mass
    probs = probs * keep
    choice = torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=gen)
    return ids.gather(-1, choice).to(logits.device)


class _Generator:
    """Batched lean decoding: rows left-padded to one length, one static cache for every batch.

    Eager on purpose: on this 2-core CPU a compiled step ran slower than eager at batch 64
    (154 against 278 tokens/s, measured), and the eager step takes any prompt length."""

    def __init__(self, model, cfg: TeacherText, max_len: int, eos: set[int], pad: int):
        self.model, self.cfg, self.eos, self.pad = model, cfg, eos, pad
        self.cache = static_cache(model, max_len)
        self.kw = {**cache_kwargs(model, self.cache), "logits_to_keep": 1}

    @torch.no_grad()
    def __call__(self, rows: list[list[int]], greedy: bool, gen: torch.Generator) -> list[list[int]]:
        """New tokens for each row, cut at the first end token."""
        cfg, n, real = self.cfg, max(len(r) for r in rows), len(rows)
        rows = rows + [rows[0]] * (cfg.batch_size - real)  # one cache shape for every batch
        device = next(self.model.parameters()).device
        ids = torch.tensor([[self.pad] * (n - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows], device=device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        self.cache.reset()
        out = self.model(ids, attention_mask=mask, position_ids=positions, cache_position=torch.arange(n, device=device),
                         **self.kw)
        token = _pick(out.logits[:, -1], cfg, greedy, gen)
        new = torch.empty(len(rows), cfg.max_new_tokens, dtype=torch.long, device=device)
        position, done = positions[:, -1:] + 1, torch.zeros(len(rows), dtype=torch.bool, device=device)
        eos, steps = torch.tensor(sorted(self.eos) or [-1], device=device), 0
        for i in range(cfg.max_new_tokens):
            new[:, i:i + 1] = token
            steps = i + 1
            done |= torch.isin(token[:, 0], eos)
            if bool(done[:real].all()) or i == cfg.max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype, device=device)], 1)
            out = self.model(token, attention_mask=mask, position_ids=position,
                             cache_position=torch.tensor([n + i], device=device),
                             **self.kw)
            token = _pick(out.logits[:, -1], cfg, greedy, gen)
            position = position + 1
        result = []
        for row in new[:real, :steps].tolist():
            cut = next((k for k, t in enumerate(row) if t in self.eos), len(row))
            result.append(row[:cut])
        return result


def _key(model, cfg: TeacherText, seeds: list[str]) -> str:
    """The weights (fingerprint), the settings and the seeds: not the model's name or the torch build,
    so the bundled text is found however the default model is named and on any torch."""
    blob = json.dumps([model_fingerprint(model), asdict(cfg), hashlib.sha256("\n".join(seeds).encode()).hexdigest()])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _batches(jobs: list[tuple[int, list[int]]], batch_size: int) -> list[list[tuple[int, list[int]]]]:
    """Jobs (index, ids) sorted by token length (little left padding), cut into batches."""
    jobs = sorted(jobs, key=lambda job: (len(job[1]), job[0]))
    return [jobs[s:s + batch_size] for s in range(0, len(jobs), batch_size)]


@torch.no_grad()
def teacher_written(model, tokenizer, cfg: TeacherText = TeacherText(), *, seeds: list[str] | None = None,
                    model_id: str = "", progress: bool = True) -> dict:
    """{"samples": [text, ...], "stats": {...}}: the teacher's replies to every seed, `cfg.rounds`
    times (round 0 greedy), cached under cache_dir()/calib; resumes an interrupted run."""
    seeds = load_seeds() if seeds is None else seeds
    if cfg.rounds < 1 or cfg.max_new_tokens < 1 or cfg.batch_size < 1:
        raise InputError("teacher text needs rounds, max_new_tokens and batch_size >= 1", "calib")
    key = _key(model, cfg, seeds)
    path = cache_dir() / "calib" / f"teacher-{len(seeds)}x{cfg.rounds}-{cfg.max_new_tokens}-{key}.json"
    if (cached := read_cached_json(path, "teacher text", "samples")) is not None:
        return cached
    bundled = BUNDLED / f"{path.name}.gz"
    if bundled.is_file():
        return json.loads(gzip.decompress(bundled.read_bytes()))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.jsonl")
    done = _read_partial(partial)
    turns = [s.split(TURN) for s in seeds]
    eos = end_tokens(model, tokenizer)
    longest = max(len(_prompt_ids(tokenizer, t[:1], [])) for t in turns)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    gen_obj = _Generator(model, cfg, 2 * longest + 2 * cfg.max_new_tokens + 8, eos, pad)
    model.eval()
    start, generated = time.perf_counter(), 0
    bar = tqdm(total=cfg.rounds * (len(seeds) + sum(len(t) > 1 for t in turns)), desc="teacher text",
               unit="reply", disable=not progress)
    bar.update(len(done))
    for rnd in range(cfg.rounds):
        for turn in (0, 1):
            jobs = [(i, _prompt_ids(tokenizer, t[:turn + 1], [done[f"{rnd}:{i}:0"]] if turn else []))
                    for i, t in enumerate(turns) if len(t) > turn and f"{rnd}:{i}:{turn}" not in done]
            for b, batch in enumerate(_batches(jobs, cfg.batch_size)):
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rnd * 10_007 + turn * 101 + b)
                greedy = rnd == 0 and b % round(1 / cfg.greedy_share) == 0 if cfg.greedy_share else False
                replies = gen_obj([ids for _, ids in batch], greedy, gen)
                texts = {f"{rnd}:{i}:{turn}": tokenizer.decode(r, skip_special_tokens=True).strip()
                         for (i, _), r in zip(batch, replies)}
                generated += sum(len(r) for r in replies)
                _end_torn_line(partial)
                with open(partial, "a") as f:
                    f.write(json.dumps(texts) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                done.update(texts)
                bar.update(len(batch))
                bar.set_postfix(tok_s=f"{generated / (time.perf_counter() - start):.0f}")
    bar.close()
    seconds = time.perf_counter() - start
    samples = _assemble(turns, done, cfg.rounds)
    result = {"samples": samples, "stats": {"seeds": len(seeds), "replies": len(done), "generated_tokens": generated,
              "seconds": seconds, "tokens_per_s": generated / seconds if seconds > 0 and generated else None,
              "config": asdict(cfg), "model_id": model_id,
              "torch": torch.__version__}}
    atomic_write(path, json.dumps(result))
    partial.unlink(missing_ok=True)
    return result


def _end_torn_line(path: Path) -> None:
    """An interrupted write left a last line without its newline: cut it (its replies are redone)."""
    if path.is_file() and path.stat().st_size:
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            path.write_bytes(data[:data.rfind(b"\n") + 1])


def _read_partial(path: Path) -> dict:
    """{"round:seed:turn": reply} from an interrupted run's partial file (a torn last line is skipped)."""
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                done.update(json.loads(line))
    return done


def _assemble(turns: list[list[str]], done: dict, rounds: int) -> list[str]:
    """One plain-text sample per seed and round: first turn, reply, then follow-up and its reply."""
    samples = []
    for rnd in range(rounds):
        for i, t in enumerate(turns):
            parts = []
            for turn, text in enumerate(t):
                reply = done.get(f"{rnd}:{i}:{turn}")
                if reply is None:
                    break
                parts += [text, reply]
            if parts:
                samples.append("\n".join(p for p in parts if p))
    return samples


def teacher_samples(model, tokenizer, n: int | None = None, cfg: TeacherText = TeacherText(), model_id: str = "",
                    progress: bool = True, shuffle_seed: int = 0) -> list[str]:
    """The teacher-written samples, shuffled (seeded), the first n of them (None: all)."""
    samples = list(teacher_written(model, tokenizer, cfg, model_id=model_id, progress=progress)["samples"])
    random.Random(shuffle_seed).shuffle(samples)
    return samples if n is None else samples[:n]


def student_continuations(student, tokenizer, prompts: list[str], batch_size: int, max_length: int,
                          new_tokens: int = 48, pool: int = 64, temperature: float = 1.0, seed: int = 0):
    """on_policy for distill_: a callable returning a batch {input_ids, attention_mask} of
    `batch_size` random prompts (plain text, as users send them) each followed by the student's own
    sampled continuation (GKD: the student learns where its own text leads it). Continuations are
    made `pool` at a time with the batched lean loop and reused for pool // batch_size batches
    (DistiLLM reuses student samples likewise)."""
    cfg = TeacherText(max_new_tokens=new_tokens, temperature=temperature, top_p=1.0, batch_size=pool, seed=seed)
    eos = end_tokens(student, tokenizer)
    pool = max(pool, batch_size)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = [tokenizer(p, truncation=True, max_length=max_length - new_tokens)["input_ids"] for p in prompts]
    rows = [r for r in rows if r]
    generator = _Generator(student, cfg, max(len(r) for r in rows) + new_tokens + 1, eos, pad)
    rng, gen, ready = random.Random(seed), torch.Generator().manual_seed(seed), []
    device = next(student.parameters()).device

    def next_batch() -> dict:
        if not ready:
            chosen = [rows[rng.randrange(len(rows))] for _ in range(pool)]
            was_training = student.training
            student.eval()
            texts = [r + c for r, c in zip(chosen, generator(chosen, False, gen))]
            student.train(was_training)
            ready.extend(right_padded(texts[start:start + batch_size], pad, device)
                         for start in range(0, len(texts) - batch_size + 1, batch_size))
        return ready.pop()
    return next_batch
