"""Assembly of GGUF models split into part packages (bcllm.io.gguf_parts), on fake parts: a tiny
GGUF written with the gguf library, split into three packages on a temporary sys.path."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys

import numpy as np
import pytest

from bcllm.errors import InputFileError
from bcllm.io.gguf_parts import PARTED, PartedGGUF, assemble, part_files


def _tiny_gguf(path, arch="qwen2", blocks=2):
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), arch)
    w.add_block_count(blocks)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_tensor("token_embd.weight", np.arange(64 * 8, dtype=np.float32).reshape(64, 8))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """(spec, package roots, whole bytes): a tiny qwen2 GGUF split into three fake part packages."""
    data = _tiny_gguf(tmp_path / "whole.gguf")
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    site = tmp_path / "site"
    names = []
    for i in range(3):
        name = f"bcllm_fake_part{i + 1}_{abs(hash(str(tmp_path))) % 10**6}"
        (site / name / "data").mkdir(parents=True)
        (site / name / "__init__.py").write_text("raise RuntimeError('part code must never run')\n")
        (site / name / "data" / f"part{i + 1:02d}.bin").write_bytes(data[cut[i]:cut[i + 1]])
        names.append(name)
    monkeypatch.syspath_prepend(str(site))
    spec = PartedGGUF(name="fake-qwen", file="fake.gguf", packages=tuple(names), version="1.0", extra="fake",
                      part_sizes=tuple(cut[i + 1] - cut[i] for i in range(3)),
                      sha256=hashlib.sha256(data).hexdigest(), arch="qwen2",
                      shapes={"block_count": 2, "embedding_length": 8, "feed_forward_length": 16})
    return spec, site, data


def _cache_left(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_assembles_parts_in_order_without_running_their_code(fake, tmp_path):
    spec, _, data = fake
    out = assemble(spec, tmp_path / "cache", progress=False)
    assert out.read_bytes() == data  # the parts joined in order, byte for byte
    assert "bcllm_fake" not in " ".join(sys.modules)  # found with find_spec, never imported
    # reused on the next call: the parts can vanish once assembled
    for f in part_files(spec):
        f.unlink()
    assert assemble(spec, tmp_path / "cache", progress=False) == out


def test_parts_in_wrong_order_are_refused(fake, tmp_path):
    spec, _, _ = fake
    swapped = dataclasses.replace(spec, packages=(spec.packages[1], spec.packages[0], spec.packages[2]),
                                  part_sizes=(spec.part_sizes[1], spec.part_sizes[0], spec.part_sizes[2]))
    with pytest.raises(InputFileError, match="sha256|GGUF"):
        assemble(swapped, tmp_path / "cache", progress=False)
    assert _cache_left(tmp_path / "cache") == []


def test_missing_part_names_it_and_the_pip_command(fake, tmp_path):
    spec, site, _ = fake
    import shutil

    shutil.rmtree(site / spec.packages[1])
    with pytest.raises(InputFileError, match=r"part 2/3 .* is not installed.*pip install"):
        assemble(spec, tmp_path / "cache", progress=False)
    assert _cache_left(tmp_path / "cache") == []


def test_truncated_part_is_refused_before_joining(fake, tmp_path):
    spec, _, _ = fake
    f = part_files(spec)[2]
    f.write_bytes(f.read_bytes()[:-5])
    with pytest.raises(InputFileError, match=r"part 3/3 .* bytes, expected .*truncated"):
        assemble(spec, tmp_path / "cache", progress=False)
    assert _cache_left(tmp_path / "cache") == []


def test_corrupt_part_of_right_size_fails_the_hash(fake, tmp_path):
    spec, _, _ = fake
    f = part_files(spec)[1]
    raw = bytearray(f.read_bytes())
    raw[10] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(InputFileError, match="sha256"):
        assemble(spec, tmp_path / "cache", progress=False)
    assert _cache_left(tmp_path / "cache") == []


def test_wrong_header_is_refused_even_without_a_recorded_hash(fake, tmp_path):
    spec, _, data = fake
    unpinned = dataclasses.replace(spec, sha256="")
    f = part_files(spec)[0]
    f.write_bytes(b"GGML" + f.read_bytes()[4:])
    with pytest.raises(InputFileError, match="do not join into a GGUF"):
        assemble(unpinned, tmp_path / "cache", progress=False)
    # a real GGUF of another shape: the header check names the key
    f.write_bytes(b"GGUF" + f.read_bytes()[4:])
    other = dataclasses.replace(unpinned, shapes={**spec.shapes, "block_count": 24})
    with pytest.raises(InputFileError, match="block_count=2, expected 24"):
        assemble(other, tmp_path / "cache", progress=False)
    wrong_arch = dataclasses.replace(unpinned, arch="llama")
    with pytest.raises(InputFileError, match="architecture 'qwen2', expected 'llama'"):
        assemble(wrong_arch, tmp_path / "cache", progress=False)
    assert _cache_left(tmp_path / "cache") == []


def test_embedded_specs_are_consistent():
    for name, spec in PARTED.items():
        assert spec.name == name and len(spec.packages) == len(spec.part_sizes)
        assert len(spec.sha256) == 64 and spec.arch == "qwen2"
        assert all(s == spec.part_sizes[0] for s in spec.part_sizes[:-1]) and spec.part_sizes[-1] <= spec.part_sizes[0]


def test_a_killed_assembly_leaves_no_partial_file_behind(fake, tmp_path):
    """SIGKILL skips cleanup: the next assembly removes a dead process's temporary file and keeps
    a live one's (another process assembling the same model now)."""
    import subprocess

    spec, _, data = fake
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (cache / f"{spec.file}.tmp{dead.pid}").write_bytes(data[:100])
    (cache / f"{spec.file}.tmp{os.getpid()}x").write_bytes(b"not a pid")
    live = cache / f"{spec.file}.tmp1"  # pid 1 always exists
    live.write_bytes(b"busy")
    assert assemble(spec, cache, progress=False).read_bytes() == data
    assert _cache_left(cache) == sorted([spec.file, live.name, f"{spec.file}.tmp{os.getpid()}x"])
