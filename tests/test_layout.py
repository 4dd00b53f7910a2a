"""The code's shape, enforced: modules import only modules below them (data flows one way), the
command line is the only place that knows argparse, and no function grows past 60 lines."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "bcllm"

# Lowest first. A module may import (at top level or inside a function) only modules before it.
ORDER = ["errors", "results", "kernel", "circulant", "models", "prompts", "stats", "modules", "surgery", "fused",
         "costs", "structures", "calib_data", "calibrate", "transforms", "reconstruct", "distill", "checkpoint",
         "artifact", "evaluate", "lmeval", "pipeline", "streaming", "experiments", "report", "bench", "cli"]


def bcllm_imports(path: Path) -> set[str]:
    """Names of the bcllm modules a file imports, anywhere in it (lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x, y
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("bcllm."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("bcllm."))
    return found


def source_modules() -> list[Path]:
    return sorted(p for p in SRC.glob("*.py") if p.name != "__init__.py")


def test_every_module_has_a_place_in_the_order():
    assert sorted(p.stem for p in source_modules()) == sorted(m for m in ORDER if (SRC / f"{m}.py").exists())


@pytest.mark.parametrize("path", source_modules(), ids=lambda p: p.stem)
def test_modules_import_only_modules_below_them(path):
    rank = {m: i for i, m in enumerate(ORDER)}
    imported = bcllm_imports(path) - {"__version__"}
    above = sorted(m for m in imported if m not in rank or rank[m] >= rank[path.stem])
    assert not above, f"{path.stem} imports {above}, which are not below it in {ORDER}"


def test_the_checker_sees_lazy_and_package_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from .a import x\nfrom . import b, c\ndef f():\n    from bcllm.d import y\n    import bcllm.e\n")
    assert bcllm_imports(f) == {"a", "b", "c", "d", "e"}


def test_argparse_only_in_the_cli():
    users = [p.stem for p in source_modules() if "argparse" in bcllm_text(p) and p.stem != "cli"]
    assert not users


def bcllm_text(path: Path) -> str:
    return " ".join(a.name for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names) + " " + " ".join(
        node.module or "" for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom))


@pytest.mark.parametrize("path", source_modules(), ids=lambda p: p.stem)
def test_no_function_over_60_lines(path):
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60]
    assert not long
