"""Does block-circulant compression get easier with model size? (issue 21)

The same recipe on the middle third of each model's decoder layers (MLP projections), circulant
and low-rank at the same parameter budget, at block sizes 16 and 4, measured on the held-out
prompts with the floor (the same modules removed). Every point is one `bcllm eval` run whose JSON
lands in RUN (a rerun measures only the missing points); its peak memory is recorded beside it.
Then the table and plot: docs/results/scale.{md,json,png}, keeping the rows already there that this
run did not measure (runs/ stays on the machine that made it).

    python scripts/scale_table.py [--models smollm2-135m,qwen2.5-0.5b,qwen2.5-1.5b] [--run runs/scale]
        [--fit sequential] [--block-sizes 16,4] [--structures circulant,lowrank] [--report-only]

Calibration is --calib pydoc-all for every model: it needs no generation, so every model gets the
same text and the larger models' calibration costs no hour of sampling.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

OUT = Path("docs/results")
PROMPTS = "src/bcllm/data/heldout_prompts.txt"
LAYERS = {"smollm2-135m": 30, "qwen2.5-0.5b": 24, "qwen2.5-1.5b": 28, "gemma3-270m": 18}
# Models fitted and evaluated with --stream (one decoder layer in memory at a time): in memory the
# 1.5B run would hold teacher and student, about 2 x 7 GB, plus statistics, near this machine's 24 GiB.
# Streamed figures are identical to in-memory ones (tests/test_streaming.py), so the recipe is the same.
STREAM = {"qwen2.5-1.5b"}


def middle_third(n_layers: int) -> str:
    return f"{round(n_layers / 3)}-{round(2 * n_layers / 3) - 1}"


def command(model: str, structure: str, block: int, fit: str, json_path: Path, epochs: int | None = None) -> list[str]:
    return ["bcllm", "eval", "--model", model, "--layers", middle_third(LAYERS[model]), "--structure", structure,
            "--block-size", str(block), "--fit", fit, "--calib", "pydoc-all", "--max-new-tokens", "0",
            "--prompts", PROMPTS, "--json", str(json_path)] + (["--stream"] if model in STREAM else []) + \
        (["--distill-steps", "0"] if fit == "block" else []) + \
        (["--block-epochs", str(epochs)] if epochs is not None else [])  # distillation needs the whole model


def run_point(cmd: list[str], json_path: Path, log: Path) -> None:
    """Run one eval; its peak resident memory (this child only, from wait4) goes beside its JSON."""
    start = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / cmd[0]), *cmd[1:]], stdout=out,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not json_path.exists():
        raise SystemExit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(cmd)}; see {log}")
    side = {"peak_rss_gib": usage.ru_maxrss / 2**20, "wall_s": time.time() - start, "command": " ".join(cmd)}
    json_path.with_suffix(".run.json").write_text(json.dumps(side, indent=1))


def row(json_path: Path) -> dict:
    d = json.loads(json_path.read_text())
    side = json.loads(json_path.with_suffix(".run.json").read_text())
    m, c = d["metrics"], d["compression"]
    block = c["calibration"].get("block") or {}
    layers = block.get("layers", [])
    return {"model": d["model"], "model_params": c["model_params_before"], "structure": c["config"]["structure"],
            "block_size": d["config"]["block_size"], "fit": c["calibration"]["fit"], "layers": d["config"]["layers"],
            "distill_steps": c["calibration"].get("distill", {}).get("steps", 0),
            "block_epochs": (block.get("block") or {}).get("epochs"),
            "token_agreement": m["token_agreement"], "agreement_ci": d["ci"]["token_agreement"],
            "kl_mean": m["kl_mean"], "floor_token_agreement": m["floor_token_agreement"],
            "floor_kl_mean": m["floor_kl_mean"], "kl_recovered": m["kl_recovered"],
            # the share of the agreement the removal lost that the structure gives back
            "agreement_recovered": (m["token_agreement"] - m["floor_token_agreement"]) /
                                   max(1e-9, 1 - m["floor_token_agreement"]),
            "params_removed": 1 - c["model_params_after"] / c["model_params_before"],
            "replaced_params": c["replaced_params"],
            # mean relative error of the compressed MLPs' outputs on held-out calibration batches (1.0 = the
            # MLP removed): after the sequential closed form, then after block reconstruction (--fit block)
            "block_error_before": (sum(x["held_before"] for x in layers) / len(layers)) if layers else None,
            "block_error_after": (sum(x["held_after"] for x in layers) / len(layers)) if layers else None,
            "wall_s": side["wall_s"], "peak_rss_gib": side["peak_rss_gib"], "streamed": "--stream" in side["command"],
            "command": side["command"]}


def key(r: dict) -> tuple:
    # rows written before block_epochs was recorded ran bcllm's default of 4
    return r["model"], r["structure"], r["block_size"], r["fit"], r["layers"], \
        r.get("block_epochs") or (4 if r["fit"] == "block" else None)


def merged(rows: list[dict]) -> list[dict]:
    """The rows already in docs/results/scale.json, with those measured in this run replacing theirs:
    runs/ is not kept between machines, so a run that measures two new points must not drop the rest."""
    old = json.loads((OUT / "scale.json").read_text()) if (OUT / "scale.json").exists() else []
    new = {key(r): r for r in rows}
    return [new.pop(key(r), r) for r in old] + list(new.values())


def report(rows: list[dict]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rows = merged(rows)
    (OUT / "scale.json").write_text(json.dumps(rows, indent=1))
    lines = ["| model | params | layers | structure | b | fit | agreement [95% CI] | KL | floor agr. / KL "
             "| kl_recovered | agr. recovered | block error (closed form -> block) | params removed | wall | peak RSS |",
             "|" + " --- |" * 15]
    for r in sorted(rows, key=lambda r: (r["fit"], r["model_params"], r["block_size"], r["structure"])):
        lo, hi = r["agreement_ci"]
        epochs = "" if r.get("block_epochs") is None else f" ({r['block_epochs']} epochs)"
        block_error = "–" if r.get("block_error_after") is None else \
            f"{r['block_error_before']:.3f} -> {r['block_error_after']:.3f}"
        lines.append(f"| {r['model']} | {r['model_params'] / 1e6:.0f}M | {r['layers']} | {r['structure']} | "
                     f"{r['block_size']} | {r['fit']}{' + distillation' if r.get('distill_steps') else ''}{epochs} | "
                     f"{r['token_agreement']:.3f} [{lo:.3f}, {hi:.3f}] | "
                     f"{r['kl_mean']:.3f} | "
                     f"{r['floor_token_agreement']:.3f} / {r['floor_kl_mean']:.2f} | {r['kl_recovered']:.3f} | "
                     f"{r['agreement_recovered']:.3f} | {block_error} | {r['params_removed']:.1%} | "
                     f"{r['wall_s'] / 60:.1f} min | {r['peak_rss_gib']:.1f} GiB"
                     f"{' (streamed)' if r.get('streamed') else ''} |")
    lines += ["", "Commands (each row):", ""] + [f"    {r['command']}" for r in rows]
    (OUT / "scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:len(rows) + 2]), flush=True)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    def series_of(r):
        return r["fit"], r["structure"], r["block_size"], key(r)[-1]  # block rows: their epochs too

    for (fit, structure, b, epochs), style in zip(sorted({series_of(r) for r in rows}, key=str, reverse=True),
                                                  ["o-", "s-", "o--", "s--", "^-", "v-", "^--", "v--"]):
        pts = sorted((r["model_params"], i, r) for i, r in enumerate(rows)
                     if series_of(r) == (fit, structure, b, epochs))
        xs, name = [p / 1e6 for p, _, _ in pts], f"{structure} b={b} {fit}" + (f" {epochs} ep." if epochs else "")
        axes[0].plot(xs, [r["token_agreement"] for _, _, r in pts], style, label=name)
        axes[1].plot(xs, [r["kl_recovered"] for _, _, r in pts], style, label=f"{name}: KL")
        axes[1].plot(xs, [r["agreement_recovered"] for _, _, r in pts], style, alpha=0.45, label=f"{name}: agreement")
    floor = sorted({(r["model_params"], r["floor_token_agreement"]) for r in rows})
    axes[0].plot([p / 1e6 for p, _ in floor], [f for _, f in floor], "k:", label="floor (MLPs removed)")
    axes[1].legend(fontsize=7)
    for ax, name in zip(axes, ["token agreement (held-out prompts)",
                               "share of the floor's loss recovered\n(1 - KL/floor KL; (agr - floor)/(1 - floor))"]):
        ax.set_xscale("log")
        ax.set_xlabel("model parameters (M)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Middle third of the MLPs compressed, each recipe the same on every model")
    fig.tight_layout()
    fig.savefig(OUT / "scale.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-0.5b,qwen2.5-1.5b")
    ap.add_argument("--structures", default="circulant,lowrank")
    ap.add_argument("--block-sizes", default="16,4")
    ap.add_argument("--fit", default="sequential")
    ap.add_argument("--run", default="runs/scale")
    ap.add_argument("--block-epochs", type=int, help="--fit block: epochs of block reconstruction (bcllm's default: 4)")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    points = [(m, s, int(b)) for m in args.models.split(",") for b in args.block_sizes.split(",")
              for s in args.structures.split(",")]
    for m in {m for m, _, _ in points}:
        if m not in LAYERS:
            raise SystemExit(f"unknown model {m!r}; this script knows {', '.join(LAYERS)}")
    done = []
    for i, (model, structure, block) in enumerate(points, 1):
        epochs = "" if args.block_epochs is None else f"-e{args.block_epochs}"
        path = run / f"{model}-{structure}-b{block}-{args.fit}{epochs}.json"
        if not path.exists() and not args.report_only:
            print(f"[{i}/{len(points)}] {model} {structure} b={block} --fit {args.fit}", flush=True)
            run_point(command(model, structure, block, args.fit, path, args.block_epochs), path,
                      path.with_suffix(".log"))
        if path.exists() and path.with_suffix(".run.json").exists():
            done.append(row(path))
            report(done)  # after every point: a long run shows its table as it goes


if __name__ == "__main__":
    main()
