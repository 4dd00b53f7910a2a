"""`bcllm compare`: the methods a user might pick instead of block-circulant, on the same modules,
measured the same way: one table and one plot of fidelity against bits per weight, with each
student's decode speed timed against dense in the same run.

    bcllm compare --layers 10-19 --fit sequential --prompts src/bcllm/data/heldout_prompts.txt --out runs/compare

Methods (METHODS): weight quantization (int8 one grid per row; int4, int3, int2 in groups of 32 on
the min..max grid), pruning (50% of each row, 2:4), low-rank and block-circulant at the parameter
counts of block sizes 4, 16 and 64, and circulant with int8 spectra. Every method gets the run's
fit, so the effort is equal: frobenius is round-to-nearest / magnitude pruning / the Frobenius
projection, sequential is GPTQ / Wanda / the sequential closed form, block adds block
reconstruction and distillation to each. `NAME@FIT` gives one method a fit of its own.

Bits per weight count what replaces each weight, with float data (scales, zero points, spectra,
factors, kept weights) at 16 bits, as a model ships: dense bfloat16 is 16. (bcllm stores spectra
and factors in float32, there being no 16-bit FFT on the CPU; `mb_read` is those bytes as stored.)

The points live in the results directory like a sweep's (results.jsonl, resumable, the floor once
per module set); the decode timings in speeds.jsonl, also resumable; compare.{json,md,png} beside.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from .. import dist
from ..errors import InputError
from ..fit.student import FITS, StudentIO, StudentSpec, build_student
from ..io.results import append_jsonl, command_line, read_jsonl, versions, write_json
from .runs import EvalSettings, Session, check_decode_bench, chosen_decode_speed, point_key

# name -> the student settings that make it (the size option is the bit width for quant; for prune
# 2 means 2:4 and any other size 50% unstructured; for low-rank the circulant block size of its budget)
METHODS = {
    "int8": {"structure": "quant", "block_size": 8},
    "int4": {"structure": "quant", "block_size": 4},
    "int3": {"structure": "quant", "block_size": 3},
    "int2": {"structure": "quant", "block_size": 2},
    "prune-50": {"structure": "prune", "block_size": 16},
    "prune-2:4": {"structure": "prune", "block_size": 2},
    "lowrank-b4": {"structure": "lowrank", "block_size": 4},
    "lowrank-b16": {"structure": "lowrank", "block_size": 16},
    "circulant-b4": {"structure": "circulant", "block_size": 4},
    "circulant-b16": {"structure": "circulant", "block_size": 16},
    "circulant-b64": {"structure": "circulant", "block_size": 64},
    "circulant-b16-int8": {"structure": "circulant", "block_size": 16, "spectra_bits": 8},
}
SPEEDS = "speeds.jsonl"
# what each fit means for each family (the table's names)
FIT_NAMES = {"quant": {"frobenius": "round to nearest", "sequential": "GPTQ"},
             "prune": {"frobenius": "magnitude", "sequential": "Wanda"}}


def parse_methods(spec: str) -> list[tuple[str, dict]]:
    """`int8,circulant-b16@block,...` (or `all`) -> [(name, settings)], checked before any model loads."""
    names = [m for s in spec.split(",") if s.strip() for m in (METHODS if s.strip() == "all" else [s.strip()])]
    if not names:
        raise InputError("--methods is empty: give method names (or all)", "methods")
    out = {}
    for name in names:
        base, at, fit = name.partition("@")
        if base not in METHODS:
            raise InputError(f"unknown method {base!r}; allowed: {', '.join(METHODS)} (or all), each optionally "
                             f"@FIT with FIT one of {', '.join(FITS)}", "methods")
        if at and fit not in FITS:
            raise InputError(f"method {name!r}: unknown fit {fit!r}; allowed: {', '.join(FITS)}", "methods")
        out[name] = {**METHODS[base], **({"fit": fit} if fit else {})}
    return list(out.items())


def method_points(base: StudentSpec, methods: list[tuple[str, dict]]) -> list[dict]:
    """Each method's settings over `base`, with the options of one family reset for the others
    (quant_grid and quant_damp are quantization's, transform the circulant MLPs'), every spec checked
    (the size options must make a config) before any model loads."""
    from ..fit.student import config_for

    defaults, points = StudentSpec(), []
    for name, settings in methods:
        point = dict(settings)
        if settings["structure"] != "quant":
            point.update(quant_grid=defaults.quant_grid, quant_damp=defaults.quant_damp)
        if settings["structure"] != "circulant":
            point.update(transform=defaults.transform)
        try:
            config_for(dataclasses.replace(base, **point))
        except InputError as e:
            raise InputError(f"method {name!r}: {e}", e.param) from None
        points.append(point)
    return points


def bits_per_weight(compression: dict) -> float:
    """Bits per replaced weight with every float value (scales, zero points, spectra, factors, kept
    weights) at 16 bits, whatever dtype they are stored in, and integer codes at their own width.
    (Biases of the replaced modules, where there are any, count as weights: a few in a thousand.)"""
    n = compression["replaced_params"]
    structure = compression["config"]["structure"]
    floats = compression["structured_params"]  # every stored value, codes included
    sizes = next(iter(compression["sizes"].values()))
    if structure == "quant":  # a code per weight, the rest scales and zero points
        return (sizes["bits"] * n + 16 * (floats - n)) / n
    if structure == "prune":  # the kept weights, and a 2-bit position each (2:4) or a 1-bit mask over all
        return (16 * floats + (2 * floats if sizes["pattern"] == "2:4" else n)) / n
    if structure == "circulant" and compression["config"].get("spectra_bits", 32) == 8:
        scales = (compression["structured_bytes"] - floats) / 4  # one int8 code per spectrum real; float32 scales
        return (8 * floats + 16 * scales) / n
    return 16 * floats / n


def method_name(compression: dict, fit: str, steps: int) -> str:
    """A row's name from what was built: `int2 group 32, GPTQ + 100 distillation steps`."""
    c, sizes = compression["config"], next(iter(compression["sizes"].values()))
    s = c["structure"]
    if s == "quant":
        group = c.get("group_size", sizes["group_size"])  # the config's None: one grid per row
        name = f"int{sizes['bits']} " + (f"group {group}" if group else "per row")
        name += ", zero-inside grid" if sizes.get("zero_point") == "int" else ""
        name += f", damping {sizes['damp']:g}" if sizes.get("damp") and fit != "frobenius" else ""
    elif s == "prune":
        name = "prune 2:4" if sizes["pattern"] == "2:4" else f"prune {sizes['sparsity']:.0%}"
    elif s == "circulant":
        name = f"circulant b={sizes['block_size']}" + (", int8 spectra" if c.get("spectra_bits") == 8 else "")
    else:
        name = f"{s} {', '.join(f'{k} {v}' for k, v in sizes.items())}"
    how = FIT_NAMES.get(s, {}).get(fit, fit)
    return f"{name}, {how}" + (f" + {steps} distillation steps" if steps else "")


def method_row(compression: dict, metrics: dict, ci: dict, fit: str, steps: int, command: str, **extra) -> dict:
    """One row of the comparison from an eval's or a point's figures."""
    return {"method": method_name(compression, fit, steps), "structure": compression["config"]["structure"],
            "bits_per_weight": bits_per_weight(compression), "mb_read": compression.get("structured_bytes", 0) / 1e6,
            "token_agreement": metrics["token_agreement"], "agreement_ci": ci.get("token_agreement"),
            "kl_mean": metrics["kl_mean"], "kl_recovered": metrics.get("kl_recovered"),
            "floor_token_agreement": metrics.get("floor_token_agreement"),
            "floor_kl_mean": metrics.get("floor_kl_mean"), "command": command, **extra}


def compare(settings: EvalSettings, out, base: StudentSpec, methods: list[tuple[str, dict]],
            decode_bench: str = "compiled", io: StudentIO = StudentIO()) -> dict:
    """Measure every method on base's modules (layers, targets) with base's fit unless the method
    names its own, each student's decode timed against dense (`decode_bench`: compiled, eager or
    none); writes compare.{json,md,png} in `out` and returns the result."""
    check_decode_bench(decode_bench)
    overrides = method_points(base, methods)
    session = Session(settings, out, base, io)
    session.save_students = decode_bench != "none"  # kept, so the decode timing need not fit it again
    points = session.effective([{**session.base_point(), **o} for o in overrides])
    keys = [point_key(p) for p in points]
    # run_points returns one record per distinct key, in order (two names for one point share it)
    by_key = dict(zip(dict.fromkeys(keys), session.run(points, "compare")))
    rows = []
    for (name, _), point, key in zip(methods, points, keys):
        r = by_key[key]
        steps = r["compression"].get("calibration", {}).get("distill", {}).get("steps", 0)
        row = method_row(r["compression"], r["metrics"], r["ci"], point["fit"], steps, eval_command(settings, point),
                         name=name, key=key, param_reduction=r["param_reduction"])
        if decode_bench != "none":
            row.update(_decode_speed(session, point, key, decode_bench))
        rows.append(row)
    result = {"rows": rows, "layers": base.layers, "targets": base.targets, "fit": base.fit,
              "prompts": settings.prompts, "model": settings.model, "model_params": session.model_params,
              "decode_bench": decode_bench, "command": command_line(), "versions": versions(),
              "wall_s": session.wall_s()}
    for path in write_outputs(result, session.out):
        print(f"wrote {path}")
    return result


def _decode_speed(session: Session, point: dict, key: str, mode: str) -> dict:
    """The decode timing of one point's student: read back from speeds.jsonl, else measured now (the
    student saved when the point was measured, or fitted again where an earlier run did not keep it)."""
    path = session.out / SPEEDS
    for record in dist.broadcast_object(read_jsonl(path)):
        if record.get("key") == key and record.get("mode") == mode:
            return record["speed"]
    folder = session.student_dir(point)
    if not dist.broadcast_object((folder / "fitted.json").is_file()):  # rank 0's disk decides for every rank
        torch.manual_seed(session.settings.seed)  # as Session.measure: the student the point measured
        build_student(session.model, session.tokenizer, dataclasses.replace(session.base, **point),
                      dataclasses.replace(session.io, save=str(folder)), eval_prompts=session.prompts,
                      model_id=session.settings.model, progress=False)
    row = {"student": str(folder)}
    chosen_decode_speed(session, row, mode)
    speed = {"decode_speedup": row["decode_speedup"], **row["speed"], "student": str(folder)}
    append_jsonl(path, {"key": key, "mode": mode, "speed": speed})
    return speed


def eval_command(settings: EvalSettings, point: dict) -> str:
    """The `bcllm eval` command that measures one method's point alone: the run's model, prompts and
    evaluation settings, and every setting of the point that differs from its default."""
    defaults = StudentSpec()
    words = ["bcllm", "eval", "--model", settings.model, "--max-new-tokens", str(settings.max_new_tokens)]
    words += ["--prompts", settings.prompts] if settings.prompts else []
    words += ["--dtype", settings.dtype] if settings.dtype != "float32" else []
    words += ["--seed", str(settings.seed)] if settings.seed else []
    for k, v in point.items():
        if v is not None and v != getattr(defaults, k, None) and v is not False:
            words += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return " ".join(words)


def markdown(result: dict) -> str:
    rows = sorted(result["rows"], key=lambda r: -r["bits_per_weight"])
    speed = any("decode_speedup" in r for r in rows)
    head = ("| method | bits / weight | MB read | agreement [95% CI] | KL | kl_recovered | params removed |"
            + (" decode speedup (byte limit) |" if speed else ""))
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        ci = r["agreement_ci"]
        ci = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        rec = f"{r['kl_recovered']:.3f}" if r.get("kl_recovered") is not None else ""
        cells = [r["method"], f"{r['bits_per_weight']:.2f}", f"{r['mb_read']:.2f}", f"{r['token_agreement']:.3f}{ci}",
                 f"{r['kl_mean']:.3f}", rec,  # quantization keeps every weight: no parameters removed
                 f"{r['param_reduction']:.1%}" if "param_reduction" in r and r["structure"] != "quant" else ""]
        if speed:
            cells.append(f"{r['decode_speedup']:.2f}x ({r['decode_byte_ratio']:.2f}x)" if "decode_speedup" in r else "")
        lines.append("| " + " | ".join(cells) + " |")
    floor = next((r for r in rows if r.get("floor_token_agreement") is not None), None)
    text = "\n".join(lines) + "\n"
    if floor:
        text += (f"\nFloor (the same modules removed): agreement {floor['floor_token_agreement']:.3f}, KL "
                 f"{floor['floor_kl_mean']:.2f}. Dense bfloat16: 16 bits a weight, agreement 1, decode 1.00x.\n")
    return text


def write_outputs(result: dict, folder) -> list[Path]:
    """compare.json, compare.md and compare.png in `folder` (rank 0 only)."""
    folder = Path(folder)
    paths = [folder / "compare.json", folder / "compare.md", folder / "compare.png"]
    if not dist.is_main():
        return paths
    write_json(paths[0], result)
    paths[1].write_text(f"`{result['command']}`\n\n" + markdown(result))
    plot(result["rows"], paths[2], f"{result['model']}, layers {result['layers']}, targets {result['targets']}")
    return paths


def plot(rows: list[dict], path, title: str) -> None:
    """Agreement and KL against bits per weight, one marker per family, the Pareto front of agreement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    marks = {"quant": "o", "prune": "s", "circulant": "^", "lowrank": "v", "blockdiag": "D", "hybrid": "P"}
    for s in sorted({r["structure"] for r in rows}):
        sel = [r for r in rows if r["structure"] == s]
        for ax, y in zip(axes, ("token_agreement", "kl_mean")):
            ax.scatter([r["bits_per_weight"] for r in sel], [r[y] for r in sel], marker=marks.get(s, "x"), label=s,
                       s=40)
    front, best = [], -1.0
    for r in sorted(rows, key=lambda r: r["bits_per_weight"]):
        if r["token_agreement"] > best:
            front.append(r)
            best = r["token_agreement"]
    axes[0].plot([r["bits_per_weight"] for r in front], [r["token_agreement"] for r in front], "k--", lw=0.8,
                 label="Pareto front")
    for ax, name in zip(axes, ("token agreement (higher is better)", "KL, nats per token (lower is better)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bits per replaced weight (float data at 16 bits)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("symlog", linthresh=1e-3)  # a lossless method's KL of 0 stays on the plot
    axes[1].set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_rows(path) -> list[dict]:
    """The rows of a compare.json (for scripts that join several runs)."""
    return json.loads(Path(path).read_text())["rows"]
