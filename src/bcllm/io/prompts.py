"""Evaluation prompts: a text file, one prompt a line, and how a prompt becomes token ids.

The default set is the bundled data/prompts_100.txt. A prompt is tokenised as
`tokenizer(prompt)` (the tokenizer's default special tokens), or through the
model's chat template with chat=True (instruction-tuned models).
"""

from __future__ import annotations

import warnings
from importlib import resources
from pathlib import Path

from ..errors import InputError, InputFileError

DEFAULT_PROMPTS = "prompts_100.txt"


HELDOUT_PROMPTS = Path(__file__).resolve().parents[1] / "data" / "heldout_prompts.txt"  # unlike any calibration text


def default_prompts_path() -> Path:
    return Path(str(resources.files("bcllm") / "data" / DEFAULT_PROMPTS))


def load_prompts(path=None) -> list[str]:
    """Non-blank lines of a text file (surrounding whitespace stripped); None = the bundled default set."""
    path = default_prompts_path() if path is None else Path(path).expanduser()
    if not path.exists():
        raise InputFileError(f"prompts file {str(path)!r} does not exist", "prompts")
    if not path.is_file():
        raise InputError(f"prompts file {str(path)!r} is not a regular file", "prompts")
    data = path.read_bytes()
    if b"\0" in data:
        raise InputError(f"prompts file {str(path)!r} is binary, not text: give a UTF-8 text file, one prompt a line", "prompts")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"prompts file {str(path)!r} is not UTF-8 text (byte {e.start}): "
                         f"give a UTF-8 text file, one prompt a line", "prompts") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"prompts file {str(path)!r} has no prompts: it is empty or holds only blank lines", "prompts")
    return prompts


def context_length(model) -> int | None:
    """The longest sequence the model accepts, from its config (None when it does not say)."""
    n = getattr(model.config, "max_position_embeddings", None)
    return int(n) if n else None


def tokenize_prompts(tokenizer, prompts: list[str], max_length: int | None = None, chat: bool = False) -> list[list[int]]:
    """Token ids of each prompt, cut to max_length tokens with a warning naming the prompts cut."""
    if chat and not getattr(tokenizer, "chat_template", None):
        raise InputError("chat=True needs a chat template and this tokenizer has none (a base model): use chat=False", "chat")
    ids = []
    for prompt in prompts:
        if chat:
            # The template already holds the special tokens; adding them again would double the BOS.
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
            ids.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
        else:
            ids.append(list(tokenizer(prompt)["input_ids"]))
    empty = [i for i, t in enumerate(ids) if not t]
    if empty:
        raise InputError(f"prompts {empty[:5]} tokenise to no tokens")
    if max_length is not None:
        if max_length < 1:
            raise InputError(f"no room for the prompt: max_length is {max_length}")
        cut = [i for i, t in enumerate(ids) if len(t) > max_length]
        if cut:
            warnings.warn(f"{len(cut)} prompt(s) longer than {max_length} tokens (the model context less the "
                          f"generated tokens) were truncated: prompt number(s) {', '.join(str(i + 1) for i in cut[:10])}"
                          f"{' ...' if len(cut) > 10 else ''}", stacklevel=2)
            ids = [t[:max_length] for t in ids]
    return ids
