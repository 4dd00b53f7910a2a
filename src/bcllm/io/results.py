"""Result files: atomic JSON, append-only JSONL, and the provenance saved beside every result."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from .. import dist
from ..errors import InputError, InputFileError


def versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "platform": platform.platform(), "cpu": cpu_model(), "threads": torch.get_num_threads()}
    for pkg in ("transformers", "bcllm", "numpy"):
        try:
            out[pkg] = __import__(pkg).__version__
        except Exception:  # a missing optional package is not an error here
            pass
    if dist.world() > 1:  # data-parallel under torchrun (dist.py): timings are of the whole group
        out["processes"] = dist.world()
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def library_versions() -> dict:
    """The versions of the libraries that compute a model's outputs: part of every cache key (a new
    torch or transformers may change kernels, defaults or the attention path)."""
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["bcllm" if sys.argv[0].endswith("bcllm") else sys.argv[0]] + sys.argv[1:])


def check_writable(path) -> Path:
    """Fail early (before any long work) when a result path's directory does not exist."""
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"cannot write {str(path)!r}: directory {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise InputError(f"cannot write {str(path)!r}: it is a directory")
    return path


def atomic_write(path, content, every_rank: bool = False) -> Path:
    """Write a file so that it is whole or absent, whatever kills the process: the bytes go to a
    temporary file in the same folder (named with the process id, so two processes never share one),
    are flushed to disk, then renamed over `path`. `content` is str, bytes, or a function that
    writes a file at the path it is given (safetensors' save_file, torch.save). A failed write
    (a full disk) removes the temporary file and leaves any earlier `path` untouched.
    Under torchrun only rank 0 writes (results, checkpoints, caches: dist.py); every_rank: a file
    this process reads back at once (a part of a cache folder it builds itself)."""
    path = Path(path)
    if not (every_rank or dist.is_main()):
        return path
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        if callable(content):
            content(str(tmp))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            with open(tmp, "wb") as f:
                f.write(content.encode() if isinstance(content, str) else content)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (the folder's entry), where the system allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_sha256(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json(path, data: dict) -> None:
    """Write JSON atomically: a killed run never leaves a half-written file."""
    atomic_write(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def read_cached_json(path, what: str, field: str) -> dict | None:
    """A cache file bcllm wrote (a JSON object with `field`), or None where there is none. A damaged
    one (cut short, overwritten) is moved aside, said in one line, and None returned: the caller
    makes it again."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and field in data:
            return data
        problem = f"no {field!r}"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problem = f"{type(e).__name__}: {e}"
    set_aside(path, what, problem, "made again")
    return None


def set_aside(path, what: str, problem: str, then: str) -> Path:
    """Move a damaged cache entry (file or folder) out of the way, beside it, and say so in one
    line on stderr; the caller then makes it again (`then` says how)."""
    path = Path(path)
    aside = path.with_name(f"{path.name}.damaged{int(time.time())}")
    os.replace(path, aside)
    print(f"bcllm: the {what} {str(path)!r} was damaged ({problem}); moved to {str(aside)!r} and {then}",
          file=sys.stderr, flush=True)
    return aside


def remove_dead_temporaries(folder, pattern: str) -> None:
    """Remove the temporary files or folders matching `pattern` (named "...tmp<pid>") in `folder`
    whose process is gone: SIGKILL skips a writer's cleanup and would leave a partial copy behind."""
    import shutil

    for tmp in Path(folder).glob(pattern):
        try:
            os.kill(int(tmp.name.rsplit(".tmp", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        except (ValueError, PermissionError, IndexError):
            pass


def read_json(path, what: str, fix: str) -> dict:
    """A JSON file bcllm wrote, or an InputFileError naming it: `what` it is, `fix` what to do."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputFileError(f"{what} {str(path)!r} does not exist; {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputFileError(f"{what} {str(path)!r} is damaged ({type(e).__name__}: {e}); {fix}") from None
    if not isinstance(data, dict):
        raise InputFileError(f"{what} {str(path)!r} is damaged (not a JSON object); {fix}")
    return data


def append_jsonl(path, record: dict) -> None:
    """Append one record and flush it to disk at once (results are never lost on a kill); under
    torchrun rank 0 only."""
    if not dist.is_main():
        return
    with open(path, "a") as f:
        f.write(json.dumps(record, default=_jsonable) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path) -> list[dict]:
    """Records of a JSONL file; a torn last line (killed mid-write) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


# Compression-summary keys renamed since results were first written, {old: new}: "circulant_params"
# counted every structure's parameters (low-rank ones too). Old result files keep the old key.
RENAMED_SUMMARY_KEYS = {"circulant_params": "structured_params"}


def structured_params(summary: dict) -> int:
    """Parameters of the structured modules in a compression summary (compress_'s), from a record
    of any version: "structured_params", or "circulant_params" in records written before the rename."""
    return summary["structured_params"] if "structured_params" in summary else summary["circulant_params"]


def with_current_keys(record: dict) -> dict:
    """A result record (its "compression" summary) or a summary as this version writes it: an old
    key also appears under its new name (RENAMED_SUMMARY_KEYS); in place, and returned."""
    summary = record.get("compression", record)
    if isinstance(summary, dict):
        for old, new in RENAMED_SUMMARY_KEYS.items():
            if old in summary and new not in summary:
                summary[new] = summary[old]
    return record


def _jsonable(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (set, tuple, range)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)
