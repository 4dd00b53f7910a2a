"""The fused CPU decode kernel (kernels/circulant_decode.cpp), built on first use.

For a few float32 rows on the CPU, `circulant.circulant_matmul` hands the whole product (block
DFT of the input, per-frequency complex multiply-accumulate over the cached spectra, inverse DFT)
to one C++ function that streams the spectra once (float32 spectra, or int8 codes with a scale per
frequency and output block: circulant_decode_int8). It is compiled through torch's extension
mechanism (a C++ compiler and ninja; `-O3 -march=native -fopenmp`) into torch's extension directory
(TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), under a name that hashes the source,
the flags, the CPU, torch and Python, so that a later process only imports it (`make setup`
builds it, through `bcllm kernel`). Where it cannot be built, one warning says why and the
torch path runs instead; BCLLM_NO_KERNEL=1 forces that path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

from ..errors import InputError
from ..io.results import atomic_write

SOURCE = Path(__file__).resolve().parent / "kernels" / "circulant_decode.cpp"
# -fopenmp compiles at::parallel_for's OpenMP region (without it, it runs serially); GOMP_parallel
# then resolves to the libgomp torch itself loaded, so the kernel shares torch's threads.
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"]
DISABLE_ENV = "BCLLM_NO_KERNEL"
_UNSET = object()
_module = _UNSET  # the loaded extension, None once it failed, _UNSET before the first try
_failure = ""  # why it failed, in full (a compiler's messages)
CALLS = [0]  # eager products the kernel computed in this process (result files record whether it ran)


def usage() -> dict:
    """{"state": built | unavailable | not loaded, "calls": eager kernel products so far}: what a
    result file records, so a figure says whether the fused kernel computed it."""
    state = "not loaded" if _module is _UNSET else "built" if _module is not None else "unavailable"
    return {"state": state, "calls": CALLS[0], **({"why": _failure.splitlines()[0][:200]} if _failure else {})}


# os.environ's own dict and the key as it stores it: a membership test there takes ~40 ns, where
# os.environ.get takes 1-2 us (it encodes the key and raises KeyError inside) on every product.
try:
    _ENV_DATA, _ENV_KEY = os.environ._data, os.environ.encodekey(DISABLE_ENV)
except AttributeError:  # another Python: the plain lookup
    _ENV_DATA, _ENV_KEY = None, None


def disabled() -> bool:
    """True when BCLLM_NO_KERNEL asks for the torch path (read on every call: setting it
    mid-process takes effect)."""
    if _ENV_DATA is not None and _ENV_KEY not in _ENV_DATA:
        return False
    return os.environ.get(DISABLE_ENV, "").strip() not in ("", "0")


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and feature flags (Linux), else the platform."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        import platform
        return platform.machine() + platform.processor()


def extension_name() -> str:
    """Module name of the built extension: changes with the source, flags, CPU, torch and Python."""
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(CFLAGS).encode(), _cpu_id().encode(),
                 torch.__version__.encode(), sys.version.encode()):
        digest.update(part + b"\0")
    return f"bcllm_circulant_{digest.hexdigest()[:16]}"


def build_dir(name: str) -> Path:
    from torch.utils.cpp_extension import get_default_build_root
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / name


def missing_tool() -> str | None:
    """Why the kernel cannot be built here (no compiler, no ninja), or None. Puts the ninja of
    the running environment (pip package `ninja`) on PATH when PATH has none."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) on PATH"
    if shutil.which("ninja") is None:
        candidates = [os.path.dirname(sys.executable)]
        try:
            import ninja
            candidates.insert(0, ninja.BIN_DIR)
        except (ImportError, AttributeError):
            pass
        found = [d for d in candidates if d and shutil.which("ninja", path=d)]
        if not found:
            return "ninja not found (pip install ninja)"
        os.environ["PATH"] = found[0] + os.pathsep + os.environ.get("PATH", "")
    return None


def _import(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build():
    """Import the extension, compiling it first if this machine has no build of this source yet."""
    name = extension_name()
    directory = build_dir(name)
    library, complete = directory / f"{name}.so", directory / "complete"
    if library.exists() and complete.exists():
        return _import(name, library)
    library.unlink(missing_ok=True)  # a build cut short may have left a truncated library
    reason = missing_tool()
    if reason:
        raise RuntimeError(reason)
    from torch.utils.cpp_extension import load

    print(f"bcllm: compiling the circulant decode kernel, once per machine (about a minute) into {directory}",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    module = load(name=name, sources=[str(SOURCE)], extra_cflags=CFLAGS, build_directory=str(directory),
                  verbose=False)
    atomic_write(complete, f"{library.name}\n", every_rank=True)  # written last: the library is whole
    print(f"bcllm: kernel built in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return module


def load():
    """The extension module, or None (after one warning naming the reason) where it cannot be built."""
    global _module, _failure
    if _module is _UNSET:
        try:
            _module = _build()
            _register_fake()
        except Exception as e:  # any build or import failure: the torch path still works
            _failure = str(e).strip() or type(e).__name__
            warnings.warn(f"bcllm: the fused circulant decode kernel is unavailable ({_failure.splitlines()[0][:300]}); "
                          f"decode products take the slower torch path (`bcllm kernel` shows the "
                          f"whole message)", RuntimeWarning, stacklevel=2)
            _module = None
    return _module


def applies(x: torch.Tensor, spectra: torch.Tensor) -> bool:
    """Whether the kernel can take this product: 2-D float32 rows on the CPU, nothing that needs
    gradients, the kernel not disabled, and built. It runs on every decode product, where each
    tensor attribute read costs ~0.1 us: the spectra's own layout (contiguous planar float32,
    as circulant.spectra makes them) is checked by the kernel, whose errors are InputErrors."""
    if _module is None or not x.is_cpu or x.dtype != torch.float32 or x.dim() != 2:
        return False
    if (x.requires_grad or spectra.requires_grad) and torch.is_grad_enabled():
        return False
    return not disabled() and (_module is not _UNSET or load() is not None)


def circulant_decode(x: torch.Tensor, spectra: torch.Tensor, out_features: int, in_features: int,
                     block_size: int, threads: int = 1) -> torch.Tensor:
    """(n, out) float32 = x @ W.T for the block-circulant W with planar `spectra` (2, F, q, p);
    `threads` > 1 splits the frequencies over that many of torch's threads, 0 over all of them.
    Call only where `applies`."""
    return _call("circulant_decode", x, spectra, out_features, in_features, block_size, threads)


def circulant_decode_int8(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, out_features: int,
                          in_features: int, block_size: int, threads: int = 1) -> torch.Tensor:
    """circulant_decode with int8 spectra: planar `codes` (2, F, q, p) int8 and `scales` (F, p)
    float32, spectra = codes * scales[None, :, None, :] (ops.circulant.quantize_spectra). Call only
    where `applies`."""
    return _call("circulant_decode_int8", x, codes, scales, out_features, in_features, block_size, threads)


def _call(name: str, *args) -> torch.Tensor:
    module = load()
    if module is None:
        raise RuntimeError("bcllm: the circulant decode kernel is not built (check kernel.applies first)")
    CALLS[0] += 1
    try:
        return getattr(module, name)(*args)
    except RuntimeError as e:  # the kernel's own checks of shapes and types: bad input, not a bug
        if "circulant_decode:" not in str(e):
            raise
        raise InputError(str(e).strip().splitlines()[0], "x") from None


def circulant_decode_op(x: torch.Tensor, spectra: torch.Tensor, out_features: int, in_features: int,
                        block_size: int, threads: int) -> torch.Tensor:
    """The kernel as the torch operator bcllm::circulant_decode, which the extension registers in
    C++ (its shape-only fake is registered on load), for graphs that torch.compile captures
    (bench.lean_decode with compile): a plain extension call would break the graph at every
    product. Eager code calls circulant_decode, which skips the dispatcher. Call only where `applies`."""
    return torch.ops.bcllm.circulant_decode.default(x, spectra, out_features, in_features, block_size, threads)


def circulant_decode_int8_op(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, out_features: int,
                             in_features: int, block_size: int, threads: int) -> torch.Tensor:
    """circulant_decode_int8 as the operator bcllm::circulant_decode_int8 (as circulant_decode_op)."""
    return torch.ops.bcllm.circulant_decode_int8.default(x, codes, scales, out_features, in_features, block_size,
                                                         threads)


def _register_fake() -> None:
    """The operators' output shapes for tracing, once per process (the library may load again)."""
    if not torch._C._dispatch_has_kernel_for_dispatch_key("bcllm::circulant_decode", "Meta"):
        torch.library.register_fake("bcllm::circulant_decode")(
            lambda x, spec, out_features, in_features, block_size, threads: x.new_empty(x.shape[0], out_features))
    if not torch._C._dispatch_has_kernel_for_dispatch_key("bcllm::circulant_decode_int8", "Meta"):
        torch.library.register_fake("bcllm::circulant_decode_int8")(
            lambda x, codes, scales, out_features, in_features, block_size, threads:
            x.new_empty(x.shape[0], out_features))


def main() -> None:
    """`bcllm kernel` (run by make setup): build now, so that no later call waits, and say the outcome."""
    if disabled():
        print(f"bcllm: the circulant decode kernel is disabled by {DISABLE_ENV}")
    elif load() is not None:
        print(f"bcllm: circulant decode kernel ready ({build_dir(extension_name())})")
    else:
        print(f"bcllm: circulant decode kernel not built; decode products use the torch path:\n{_failure}",
              file=sys.stderr)
