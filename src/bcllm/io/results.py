"""Result files: atomic JSON, append-only JSONL, and the provenance saved beside every result."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from pathlib import Path

from ..errors import InputError


def versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "platform": platform.platform(), "cpu": cpu_model(), "threads": torch.get_num_threads()}
    for pkg in ("transformers", "bcllm", "numpy"):
        try:
            out[pkg] = __import__(pkg).__version__
        except Exception:  # a missing optional package is not an error here
            pass
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


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


def write_json(path, data: dict) -> None:
    """Write JSON atomically: a killed run never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)


def append_jsonl(path, record: dict) -> None:
    """Append one record and flush it to disk at once (results are never lost on a kill)."""
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
