"""The fused CPU decode kernel (bcllm.ops.kernel) against explicit dense matrices and the reference
product, through the module and the fused gate/up MLP, and its fallback to the torch path.
Skipped only where no C++ compiler (or ninja) is available to build it."""

import functools
import re
import warnings

import pytest
import torch
from conftest import tiny_model
from test_circulant import explicit_dense

from bcllm import CirculantConfig, compress_
from bcllm.ops import circulant
from bcllm.ops import kernel
from bcllm.errors import InputError
from bcllm.structures import BlockCirculantLinear, FusedCirculantMLP

# (out, in, b): every block size the module allows a kernel for, odd ones included, with
# dimensions b does not divide (padding on either side) as well as exact ones.
SHAPES = [(5, 7, 1), (9, 7, 2), (10, 13, 3), (17, 30, 4), (23, 11, 5), (40, 33, 8), (48, 48, 8), (100, 70, 16),
          (70, 129, 32), (200, 130, 64), (64, 64, 64), (300, 256, 128), (33, 50, 7)]
ROWS = range(1, 9)


@pytest.fixture(scope="module")
def built():
    if kernel.disabled():
        pytest.skip(f"{kernel.DISABLE_ENV} is set")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = kernel.load()
    if module is None:
        reason = kernel.missing_tool()
        if reason:
            pytest.skip(f"cannot build the kernel here: {reason}")
        pytest.fail("a compiler is available but the kernel did not build (see the warning)")
    return module


def row_errors(y, ref):
    """Relative error of each row (float64)."""
    return ((y.double() - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-30)).max().item()


@functools.lru_cache(maxsize=None)
def problem(out_f, in_f, b):
    torch.manual_seed(out_f * 1000 + in_f * 10 + b)
    p, q = circulant.grid_shape(out_f, in_f, b)
    c = torch.randn(p, q, b)
    return circulant.spectra(c), explicit_dense(c.double(), out_f, in_f)


@pytest.mark.parametrize("out_f,in_f,b", SHAPES)
def test_kernel_matches_explicit_dense_and_reference(built, out_f, in_f, b):
    spec, dense = problem(out_f, in_f, b)
    for n in ROWS:
        x = torch.randn(n, in_f)
        ref = x.double() @ dense.T
        reference = circulant.circulant_matmul_planar(x, spec, out_f, in_f, b)
        for threads in (1, 2, 3):
            y = kernel.circulant_decode(x, spec, out_f, in_f, b, threads)
            assert y.shape == (n, out_f) and y.dtype == torch.float32 and y.is_contiguous()
            assert row_errors(y, ref) < 1e-5, (n, threads)
            assert row_errors(y, reference.double()) < 1e-5, (n, threads)


def count_calls(monkeypatch):
    calls = []
    real = kernel.circulant_decode
    monkeypatch.setattr(kernel, "circulant_decode", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    return calls


@pytest.mark.parametrize("out_f,in_f,b", [(100, 70, 16), (200, 130, 64), (10, 13, 3)])
def test_module_decode_takes_the_kernel_and_matches_dense(built, monkeypatch, out_f, in_f, b):
    calls = count_calls(monkeypatch)
    layer = BlockCirculantLinear(in_f, out_f, b)
    with torch.no_grad():
        layer.bias.normal_()
        dense = explicit_dense(layer.c.double(), out_f, in_f)
        for n in ROWS:
            x = torch.randn(1, n, in_f)
            ref = x[0].double() @ dense.T + layer.bias.double()
            assert row_errors(layer(x)[0], ref) < 1e-5
        dispatched = [n for n in ROWS if n <= circulant.KERNEL_MAX_ROWS]  # more rows: the planar torch path
        assert calls == dispatched
        layer(torch.randn(9, in_f))
    assert calls == dispatched


def test_strided_and_other_dtype_rows(built, monkeypatch):
    calls = count_calls(monkeypatch)
    spec, dense = problem(70, 129, 32)
    wide = torch.randn(2, 2 * 129)
    for x in (wide[:, ::2], wide[:, 1::2].double(), wide.t().contiguous().t()[:, :129]):
        assert not x.is_contiguous() or x.dtype != torch.float32
        y = circulant.circulant_matmul(x, spec, 70, 129, 32)
        assert row_errors(y, x.double() @ dense.T) < 1e-5
    assert calls == [2, 2, 2]


def test_paths_that_need_gradients_keep_the_torch_path(built, monkeypatch):
    calls = count_calls(monkeypatch)
    layer = BlockCirculantLinear(40, 24, 8)
    x = torch.randn(2, 40, requires_grad=True)
    layer(x).square().sum().backward()  # c and x need gradients
    assert calls == [] and layer.c.grad is not None and x.grad is not None
    with torch.no_grad():
        layer(x)
    assert calls == [2]


def test_fused_gate_up_share_one_kernel_call(built, monkeypatch):
    model = tiny_model("llama", layers=2)
    compress_(model, CirculantConfig(block_size=16, targets="mlp"))
    mlp = model.model.layers[0].mlp
    fused = FusedCirculantMLP(mlp)
    calls = count_calls(monkeypatch)
    with torch.no_grad():
        for n in ROWS:
            x = torch.randn(1, n, mlp.gate_proj.in_features)
            ref = mlp(x)  # gate, up and down one by one: three kernel calls
            assert row_errors(fused(x)[0], ref[0].double()) < 1e-5  # gate and up in one call, then down
    assert calls == [n for n in ROWS if n <= circulant.KERNEL_MAX_ROWS for _ in range(5)]


def test_forced_build_failure_warns_once_and_matches(monkeypatch):
    calls = []

    def failing_build():
        calls.append(1)
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(kernel, "_module", kernel._UNSET)  # as in a fresh process
    monkeypatch.setattr(kernel, "_build", failing_build)
    spec, dense = problem(100, 70, 16)
    with pytest.warns(RuntimeWarning, match="no compiler here") as record:
        for n in ROWS:
            x = torch.randn(n, 70)
            assert row_errors(circulant.circulant_matmul(x, spec, 100, 70, 16), x.double() @ dense.T) < 1e-5
    assert len([w for w in record if "kernel" in str(w.message)]) == 1 and calls == [1]
    assert not kernel.applies(torch.randn(1, 70), spec)


def test_environment_variable_forces_the_torch_path(built, monkeypatch):
    calls = count_calls(monkeypatch)
    monkeypatch.setenv(kernel.DISABLE_ENV, "1")
    spec, dense = problem(40, 33, 8)
    x = torch.randn(2, 33)
    assert row_errors(circulant.circulant_matmul(x, spec, 40, 33, 8), x.double() @ dense.T) < 1e-5
    assert calls == []


def test_bad_shapes_are_input_errors(built):
    spec, _ = problem(40, 33, 8)
    with pytest.raises(InputError, match="columns"):
        kernel.circulant_decode(torch.randn(2, 32), spec, 40, 32, 8)
    with pytest.raises(InputError, match="frequencies"):
        kernel.circulant_decode(torch.randn(2, 33), spec, 40, 33, 16)
    with pytest.raises(InputError, match="output blocks"):
        kernel.circulant_decode(torch.randn(2, 33), spec, 41, 33, 8)


def test_source_ships_with_the_package():
    assert kernel.SOURCE.is_file() and b"circulant_decode" in kernel.SOURCE.read_bytes()


def test_extension_name_changes_with_what_the_build_depends_on(monkeypatch, tmp_path):
    """A later process imports the build under this name: it must be stable, depend on the
    source's bytes (not its path), and change with each input of the build (a stale library
    loaded after an upgrade would compute with another kernel or crash)."""
    name = kernel.extension_name()
    assert re.fullmatch(r"bcllm_circulant_[0-9a-f]{16}", name)  # an importable module name
    assert kernel.extension_name() == name
    assert kernel.build_dir(name).name == name
    copy = tmp_path / "copy.cpp"
    copy.write_bytes(kernel.SOURCE.read_bytes())
    edited = tmp_path / "edited.cpp"
    edited.write_bytes(kernel.SOURCE.read_bytes() + b"\n// one more line\n")
    with monkeypatch.context() as m:
        m.setattr(kernel, "SOURCE", copy)
        assert kernel.extension_name() == name  # the same bytes elsewhere: the same build
    changes = {
        "source bytes": lambda m: m.setattr(kernel, "SOURCE", edited),
        "compiler flags": lambda m: m.setattr(kernel, "CFLAGS", kernel.CFLAGS + ["-DNDEBUG"]),
        "CPU": lambda m: m.setattr(kernel, "_cpu_id", lambda: "model name : another CPU\nflags : sse2"),
        "torch version": lambda m: m.setattr(kernel.torch, "__version__", torch.__version__ + ".other"),
        "Python version": lambda m: m.setattr(kernel.sys, "version", kernel.sys.version + " other"),
    }
    names = {}
    for what, change in changes.items():
        with monkeypatch.context() as m:
            change(m)
            names[what] = kernel.extension_name()
            assert names[what] != name, f"the name does not change with the {what}"
            assert kernel.extension_name() == names[what], what
        assert kernel.extension_name() == name, what  # undone: the original name again
    assert len(set(names.values())) == len(names), names  # each change gives its own name


def test_missing_tools_are_named_and_a_pip_ninja_is_found(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    assert "no-such-compiler-xyz" in kernel.missing_tool()
    monkeypatch.delenv("CXX")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert "compiler" in kernel.missing_tool()
    # a compiler on PATH, ninja only beside the interpreter (pip's ninja in a venv that is not activated)
    tools, venv = tmp_path / "tools", tmp_path / "venv"
    tools.mkdir(), venv.mkdir()
    for directory, name in ((tools, "c++"), (venv, "ninja")):
        (directory / name).write_text("#!/bin/sh\n")
        (directory / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(tools))
    monkeypatch.setattr(kernel.sys, "executable", str(venv / "python"))
    monkeypatch.setitem(kernel.sys.modules, "ninja", None)  # no ninja package: look beside the interpreter
    assert kernel.missing_tool() is None
    assert kernel.os.environ["PATH"].split(kernel.os.pathsep)[0] == str(venv)
    (venv / "ninja").unlink()
    monkeypatch.setenv("PATH", str(tools))
    assert "ninja" in kernel.missing_tool()


def test_cli_builds_and_reports(built, capsys, monkeypatch):
    from bcllm.cli import main

    assert main(["kernel"]) == 0
    assert "kernel ready" in capsys.readouterr().out
    monkeypatch.setenv(kernel.DISABLE_ENV, "1")
    assert main(["kernel"]) == 0
    assert "disabled" in capsys.readouterr().out
