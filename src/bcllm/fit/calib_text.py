"""Calibration text: where it comes from, how it becomes batches, and the overlap check.

Sources (DESIGN.md section 2), each a list of strings, one sample each:
  - a text file, one sample a line (`prompts.load_prompts` reads it);
  - "pydoc": paragraphs of `pydoc_data.topics`, English technical prose every Python carries;
  - "self-chat" / "self-seed": text the original model writes itself (`self_generated`):
    chat: it writes an instruction about a topic through its chat template, then answers it;
    seed: it continues short seeds ("The", "In 1990,"). Cached under models.cache_dir()/calib.
Calibration text must not overlap the evaluation prompts: `check_overlap` refuses it.
"""

from __future__ import annotations

import hashlib
import json
import random
import re

import torch
from tqdm.auto import tqdm

from .. import dist
from ..errors import InputError
from ..io.models import cache_dir
from ..io.results import atomic_write, library_versions, read_cached_json
from .teacher_text import right_padded

SOURCES = ("mix", "teacher", "self-chat", "self-seed", "pydoc", "pydoc-all")
MIX_SELF = 96  # self-generated samples in the "mix" source

# Topics for the teacher's own instructions: everyday, school and technical subjects, chosen to be
# unlike the default evaluation prompts (which are about FFT, circulant matrices and LLMs).
TOPICS = ["cooking pasta", "the water cycle", "the French Revolution", "training for a marathon", "volcanoes",
          "saving money", "photosynthesis", "writing a cover letter", "the solar system", "gardening tomatoes",
          "the Roman Empire", "learning a language", "climate change", "sorting a list in Python", "honey bees",
          "chess openings", "the human heart", "planning a trip to Japan", "renewable energy", "job interviews",
          "the history of jazz", "baking bread", "dinosaurs", "time management", "the stock market",
          "writing poetry", "earthquakes", "healthy sleep", "the printing press", "SQL databases",
          "ocean tides", "caring for a puppy", "the Renaissance", "electric cars", "recycling plastic",
          "Shakespeare's plays", "the immune system", "public speaking", "black holes", "making coffee",
          "world war one", "birds migrating", "a birthday party", "web browsers", "the Amazon rainforest",
          "vitamins", "the moon landing", "knitting", "friendship", "thunderstorms"]
SEEDS = ["The", "In", "A", "Once upon a time", "When", "It is", "My", "Today", "There are", "How to",
         "In 1990,", "One of the", "Scientists", "The best way to", "If you", "This article", "We", "Many people",
         "According to", "After"]


def pydoc_samples(n: int | None = None, seed: int = 0, min_words: int = 20, max_words: int = 120) -> list[str]:
    """Paragraphs of the Python reference topics (offline natural prose), shuffled, code lines dropped."""
    from pydoc_data.topics import topics

    paragraphs = []
    for text in topics.values():
        for para in re.split(r"\n\s*\n", text):
            if para.startswith((" ", "\t")):  # indented: code or grammar, not prose
                continue
            words = para.split()
            if len(words) >= min_words:
                paragraphs.append(" ".join(words[:max_words]))
    paragraphs = sorted(set(paragraphs))
    random.Random(seed).shuffle(paragraphs)
    return paragraphs if n is None else paragraphs[:n]


def pydoc_chunks(n: int | None = None, seed: int = 0, words: int = 80) -> list[str]:
    """All of the Python reference topics, prose and code examples alike (about 65k words, 110k
    SmolLM2 tokens), cut at paragraph breaks into chunks of at most `words` words, shuffled."""
    from pydoc_data.topics import topics

    chunks = []
    for key in sorted(topics):
        current: list[str] = []
        for para in re.split(r"\n\s*\n", topics[key]):
            para_words = para.split()
            if current and len(" ".join(current).split()) + len(para_words) > words:
                chunks.append("\n\n".join(current))
                current = []
            while len(para_words) > words:  # a long paragraph: cut it into runs of words
                chunks.append(" ".join(para_words[:words]))
                para_words = para_words[words:]
            if para_words:
                current.append(para.strip() if len(para.split()) <= words else " ".join(para_words))
        if current:
            chunks.append("\n\n".join(current))
    chunks = [c for c in dict.fromkeys(chunks) if len(c.split()) >= 8]
    random.Random(seed).shuffle(chunks)
    return chunks if n is None else chunks[:n]


def _sample(model, tokenizer, texts: list[str], max_new_tokens: int, temperature: float, seed: int,
            add_special_tokens: bool) -> list[str]:
    """Sampled continuations (new text only) of a batch of texts, left-padded."""
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    torch.manual_seed(seed)
    out = model.generate(**enc, do_sample=True, temperature=temperature, top_p=SAMPLING["top_p"],
                         max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() for row in out]


def _chat(tokenizer, message: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                         add_generation_prompt=True)


# sampling of the self-written text: temperatures of seed continuations, questions, answers; top-p
SAMPLING = {"seed": 0.8, "question": 0.9, "answer": 0.7, "top_p": 0.95}


@torch.no_grad()
def self_generated(model, tokenizer, n: int, kind: str = "self-chat", max_new_tokens: int = 64, seed: int = 0,
                   model_id: str = "", batch_size: int = 16, progress: bool = True) -> list[str]:
    """n calibration samples written by the model itself, cached on disk (same model, kind, n,
    length and seed -> same file). self-chat needs a chat template; self-seed works on any model."""
    if kind not in ("self-chat", "self-seed"):
        raise InputError(f"unknown self-generated kind {kind!r}; allowed: self-chat, self-seed", "calib")
    if n < 1:
        raise InputError(f"number of calibration samples must be >= 1, got {n}", "calib_samples")
    if kind == "self-chat" and not getattr(tokenizer, "chat_template", None):
        raise InputError("self-chat calibration needs a chat template; this tokenizer has none: use self-seed", "calib")
    from ..io.models import model_fingerprint

    # every input of the text: batch size sets the per-batch seeds and padding; the temperatures and
    # seed lists are constants here, hashed so an edit to them gives a new file
    lists = hashlib.sha256(json.dumps([SEEDS, TOPICS, SAMPLING]).encode()).hexdigest()
    key = hashlib.sha256(json.dumps([model_id, model_fingerprint(model, full=True), kind, n, max_new_tokens, seed,
                                     batch_size, lists, next(model.parameters()).device.type,
                                     library_versions()]).encode())
    path = cache_dir() / "calib" / f"{kind}-{n}-{max_new_tokens}-{seed}-{key.hexdigest()[:16]}.json"
    if (cached := read_cached_json(path, "calibration text", "samples")) is not None:
        return cached["samples"]

    rng = random.Random(seed)
    samples = []
    padding_side = tokenizer.padding_side
    try:
        for start in tqdm(range(0, n, batch_size), desc=f"calibration text ({kind})", disable=not progress):
            count = min(batch_size, n - start)
            if kind == "self-seed":
                seeds = [rng.choice(SEEDS) for _ in range(count)]
                texts = _sample(model, tokenizer, seeds, max_new_tokens, SAMPLING["seed"], seed + start, True)
                samples += [f"{s} {t}".strip() for s, t in zip(seeds, texts)]
                continue
            asks = [_chat(tokenizer, f"Write one question or request that a user might ask about "
                                     f"{rng.choice(TOPICS)}. Reply with the question only.") for _ in range(count)]
            questions = [q.splitlines()[0].strip() if q.strip() else "Tell me something interesting."
                         for q in _sample(model, tokenizer, asks, 32, SAMPLING["question"], seed + start, False)]
            answers = _sample(model, tokenizer, [_chat(tokenizer, q) for q in questions], max_new_tokens,
                              SAMPLING["answer"], seed + start + 1, False)
            samples += [f"{q} {a}".strip() for q, a in zip(questions, answers)]
    finally:
        tokenizer.padding_side = padding_side
    samples = [" ".join(s.split()) for s in samples]  # one sample a line, as in a calibration file
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"kind": kind, "n": n, "max_new_tokens": max_new_tokens, "seed": seed,
                                   "model_id": model_id, "samples": samples}))
    return samples


def _normalize(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def overlapping(samples: list[str], prompts: list[str], ngram: int = 10) -> list[int]:
    """Indices of the samples that contain an evaluation prompt or share a run of `ngram` words with one."""
    prompt_words = [_normalize(p) for p in prompts]
    whole = {" ".join(w) for w in prompt_words if w}
    grams = {" ".join(w[i:i + ngram]) for w in prompt_words for i in range(len(w) - ngram + 1)}
    bad = []
    for i, s in enumerate(samples):
        words = _normalize(s)
        text = " " + " ".join(words) + " "
        if any(f" {p} " in text for p in whole) or \
                any(" ".join(words[k:k + ngram]) in grams for k in range(len(words) - ngram + 1)):
            bad.append(i)
    return bad


def check_overlap(samples: list[str], prompts: list[str], ngram: int = 10, force: bool = False) -> int:
    """Refuse (InputError) calibration samples that contain an evaluation prompt, or share a run
    of `ngram` words with one. Returns the number of overlapping samples (force=True: no error)."""
    bad = overlapping(samples, prompts, ngram)
    if bad and not force:
        raise InputError(f"{len(bad)} calibration samples overlap the evaluation prompts (first: line "
                         f"{bad[0] + 1}: {samples[bad[0]][:60]!r}); calibrating on evaluation text flatters the "
                         f"figures. Use other calibration text, or force it (force_overlap)", "force_overlap")
    return len(bad)


def make_batches(tokenizer, samples: list[str], batch_size: int = 8, max_length: int = 128,
                 device="cpu") -> list[dict]:
    """Right-padded token batches {input_ids, attention_mask}, samples cut to max_length tokens.
    Samples are sorted by length first so that batches carry little padding."""
    if not samples:
        raise InputError("no calibration samples")
    ids = [tokenizer(s, truncation=True, max_length=max_length)["input_ids"] for s in samples]
    ids = sorted((i for i in ids if len(i) >= 2), key=len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return [right_padded(ids[start:start + batch_size], pad, device) for start in range(0, len(ids), batch_size)]


def mixed(model, tokenizer, n: int, max_new_tokens: int = 48, seed: int = 0, model_id: str = "",
          progress: bool = True) -> list[str]:
    """n samples: MIX_SELF (at most n // 4) written by the model itself (self-chat through its chat
    template, or self-seed for a model without one), the rest all of pydoc (prose and code),
    shuffled together: chat-like and technical text, code, at scale without the model's generation
    being the bottleneck."""
    kind = "self-chat" if getattr(tokenizer, "chat_template", None) else "self-seed"
    n_self = min(MIX_SELF, n // 4)
    # always the same MIX_SELF samples (one cache entry), of which the first n_self are used
    own = self_generated(model, tokenizer, MIX_SELF, kind, max_new_tokens, seed, model_id,
                         progress=progress)[:n_self] if n_self else []
    samples = own + pydoc_chunks(n - n_self, seed)
    random.Random(seed).shuffle(samples)
    return samples


def load_calibration(source: str, model=None, tokenizer=None, n: int = 100, max_new_tokens: int = 64,
                     seed: int = 0, model_id: str = "", progress: bool = True) -> list[str]:
    """Calibration samples from a source name (SOURCES) or a text file path, one sample a line.
    Under torchrun rank 0 reads or writes (and caches) them first, the other ranks then read its cache."""
    with dist.main_first():
        return _calibration(source, model, tokenizer, n, max_new_tokens, seed, model_id, progress)


def _calibration(source, model, tokenizer, n, max_new_tokens, seed, model_id, progress) -> list[str]:
    if source in ("self-chat", "self-seed"):
        return self_generated(model, tokenizer, n, source, max_new_tokens, seed, model_id, progress=progress)
    if source == "teacher":  # the teacher's replies to the bundled seeds (teacher_text.py), cached
        from .teacher_text import teacher_samples

        return teacher_samples(model, tokenizer, n, model_id=model_id, progress=progress, shuffle_seed=seed)
    if source == "pydoc":
        return pydoc_samples(n, seed)
    if source == "pydoc-all":
        return pydoc_chunks(n, seed)
    if source == "mix":
        return mixed(model, tokenizer, n, max_new_tokens, seed, model_id, progress)
    from ..io.prompts import load_prompts

    samples = load_prompts(source)
    return samples[:n] if n else samples
