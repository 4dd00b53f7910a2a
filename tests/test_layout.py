"""The code's shape, enforced: modules import only modules below them (data flows one way), the
command line is the only place that knows argparse and holds no library logic, and no function
grows past 60 lines."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "bcllm"

# Layers, lowest first; within a layer, modules are ordered too. A module may import (at top level
# or inside a function) only modules before it. io is split in two: reading and writing files
# (results, GGUF parts, models, prompts) sits at the bottom; saved and exported students (checkpoint, artifact)
# sit above the fits, since loading one re-applies the structures and channel transforms it was fitted with.
LAYERS = [
    ("errors", ["errors"]),
    ("dist", ["dist"]),
    ("io: files", ["io.results", "io.gguf_parts", "io.models", "io.prompts"]),
    ("ops", ["ops.kernel", "ops.circulant_math", "ops.circulant", "ops.stats", "ops.costs"]),
    ("surgery", ["surgery"]),
    ("structures", ["structures.base", "structures.circulant", "structures.lowrank", "structures.blockdiag",
                    "structures.hybrid", "structures.quantized", "structures.costs"]),
    ("fit", ["fit.closed_form", "fit.teacher_text", "fit.calib_text", "fit.transforms", "fit.reconstruct", "fit.distill"]),
    ("io: saved students", ["io.checkpoint", "io.artifact"]),
    ("fit: build_student", ["fit.student"]),
    ("eval", ["eval.metrics", "eval.lmeval", "eval.streaming", "eval.student"]),
    ("bench, experiments", ["bench.measure", "bench.layer", "experiments.runs", "experiments.compare",
                            "experiments.report"]),
    ("cli", ["cli.main"]),
]
ORDER = [m for _, modules in LAYERS for m in modules]
PACKAGES = ["ops", "structures", "fit", "eval", "experiments", "bench", "io", "cli"]


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(SRC).with_suffix("").parts)


def _resolve(name: str, level: int, module: str | None) -> list[str]:
    """Dotted name (under bcllm) that a relative import in module `name` points at."""
    package = name.split(".")[:-1]
    base = package[:len(package) - (level - 1)] if level > 1 else package
    return base + (module.split(".") if module else [])


def _expand(parts: list[str], names=()) -> set[str]:
    """A bcllm module, or the modules named from a package (`from ..ops import circulant`); a
    package imported as such counts as every module in it."""
    target = ".".join(parts)
    if (SRC.joinpath(*parts, "__init__.py")).exists() if parts else True:
        found = {f"{target}.{n}" if target else n for n in names if n != "__version__"}
        found = {m for m in found if SRC.joinpath(*m.split(".")).with_suffix(".py").exists()}
        leftovers = [n for n in names if not (f"{target}.{n}" if target else n) in found and n != "__version__"]
        if leftovers:  # names defined by the package's __init__: every module of the package
            found |= {module_name(p) for p in SRC.joinpath(*parts).glob("*.py") if p.name != "__init__.py"}
        return found
    return {target}


def bcllm_imports(path: Path, name: str | None = None) -> set[str]:
    """Dotted names of the bcllm modules a file imports, anywhere in it (lazy imports count); `name`:
    the file's module name, when it does not lie in the package."""
    name = name or module_name(path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
        if isinstance(node, ast.ImportFrom) and node.level:
            found |= _expand(_resolve(name, node.level, node.module), names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "bcllm":
            found |= _expand(node.module.split(".")[1:], names)
        elif isinstance(node, ast.Import):
            found |= {m for n in names if n.startswith("bcllm.") for m in _expand(n.split(".")[1:])}
    return found


def source_modules() -> list[Path]:
    """Every library module: package __init__ files (re-exports only), the entry points and the
    files the export copies or lm-eval loads are checked separately."""
    return sorted(p for p in SRC.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")
                  and "hf_template" not in p.parts and "data" not in p.parts)


def test_every_module_has_a_place_in_the_order():
    assert sorted(module_name(p) for p in source_modules()) == sorted(
        m for m in ORDER if SRC.joinpath(*m.split(".")).with_suffix(".py").exists())


def test_every_package_is_in_the_layers():
    assert sorted(p.name for p in SRC.iterdir() if (p / "__init__.py").exists() and p.name != "data"
                  and "hf_template" not in p.name) == sorted(PACKAGES)


@pytest.mark.parametrize("path", source_modules(), ids=module_name)
def test_modules_import_only_modules_below_them(path):
    rank = {m: i for i, m in enumerate(ORDER)}
    imported = bcllm_imports(path)
    above = sorted(m for m in imported if m not in rank or rank[m] >= rank[module_name(path)])
    assert not above, f"{module_name(path)} imports {above}, which are not below it in {ORDER}"


@pytest.mark.parametrize("package", [p for p in PACKAGES if p != "cli"])
def test_a_package_init_reexports_only_its_own_modules(package):
    imported = bcllm_imports(SRC / package / "__init__.py")
    assert all(m.startswith(package + ".") for m in imported), imported


def test_the_checker_sees_lazy_relative_and_package_imports(tmp_path):
    f = tmp_path / "probe.py"
    f.write_text("from .distill import x\nfrom ..ops import circulant, kernel\nfrom ..surgery import y\n"
                 "def f():\n    from bcllm.io.models import z\n    import bcllm.eval.metrics\n    from .. import __version__\n")
    assert bcllm_imports(f, "fit.probe") == {"fit.distill", "ops.circulant", "ops.kernel", "surgery", "io.models", "eval.metrics"}


def imported_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return ({a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
             for a in n.names} | {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)})


def test_argparse_only_in_the_cli():
    users = [module_name(p) for p in source_modules() if "argparse" in imported_names(p)
             and not module_name(p).startswith("cli.")]
    assert not users


@pytest.mark.parametrize("path", source_modules(), ids=module_name)
def test_no_function_over_60_lines(path):
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60]
    assert not long


HANDLER_MAX_LINES = 25


@pytest.mark.parametrize("path", sorted((SRC / "cli").glob("*.py")), ids=lambda p: p.stem)
def test_cli_holds_no_library_logic(path):
    """A command handler (cmd_*) parses, calls one library function and prints: at most 25 lines;
    and nothing in cli/ computes with tensors (no torch beyond seeding, threads and device checks)."""
    tree = ast.parse(path.read_text())
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef) and n.name.startswith("cmd_")
            and n.end_lineno - n.lineno + 1 > HANDLER_MAX_LINES]
    assert not long
    torch_calls = {f"torch.{n.attr}" for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                   and isinstance(n.value, ast.Name) and n.value.id == "torch"}
    assert torch_calls <= {"torch.manual_seed", "torch.set_num_threads", "torch.device", "torch.cuda",
                           "torch.__version__"}, torch_calls
