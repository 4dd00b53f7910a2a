"""Quantization and pruning beside circulant and low-rank at equal bits per weight (issue 20).

Reads the sweep of runs/baselines/run.sh (MLPs of layers 10-19 of SmolLM2, held-out prompts,
rounding / magnitude and the sequential fits: GPTQ / Wanda / least squares) and the `bcllm eval`
JSONs of the recovery recipes, and writes docs/results/baselines.{json,md,png}: bits per weight of
the replaced weights (float data at 16 bits, as a model is shipped: bf16 is 16 bits a weight),
token agreement, KL, kl_recovered and the floor.

    python scripts/baselines_table.py [--run DIR ...] [--evals docs/results/eval_*.json ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

OUT = Path("docs/results")
PROMPTS = "src/bcllm/data/heldout_prompts.txt"
FIT_NAMES = {"quant": {"frobenius": "round to nearest", "sequential": "GPTQ (sequential)"},
             "prune": {"frobenius": "magnitude", "sequential": "Wanda (sequential)"}}


def bits16(compression: dict) -> float:
    """Bits per replaced weight with float data (scales, spectra, factors, kept weights) at 16 bits."""
    n = compression["replaced_params"]  # SmolLM2's MLPs have no biases: every replaced parameter is a weight
    structure = compression["config"]["structure"]
    stored = compression.get("structured_bytes", 4 * compression["structured_params"])
    sizes = next(iter(compression["sizes"].values()))
    if structure == "quant":
        int_bytes = n * sizes["bits"] / 8
    elif structure == "prune":
        kept = compression["structured_params"]
        int_bytes = (2 * kept if sizes["pattern"] == "2:4" else n) / 8
    else:
        int_bytes = 0
    return 8 * (int_bytes + (stored - int_bytes) / 2) / n


def method(compression: dict, fit: str, steps: int) -> str:
    c, sizes = compression["config"], next(iter(compression["sizes"].values()))
    s = c["structure"]
    if s == "quant":
        name = f"int{sizes['bits']} " + (f"group {sizes['group_size']}" if sizes["group_size"] else "per row")
        name += ", zero-inside grid" if sizes.get("zero_point") == "int" else ""
        name += f", damping {sizes['damp']:g}" if sizes.get("damp") and fit != "frobenius" else ""
    elif s == "prune":
        name = "prune 2:4" if sizes["pattern"] == "2:4" else f"prune {sizes['sparsity']:.0%}"
    elif s == "circulant":
        name = f"circulant b={sizes['block_size']}"
    else:
        name = f"{s} {', '.join(f'{k} {v}' for k, v in sizes.items())}"
    how = FIT_NAMES.get(s, {}).get(fit, fit)
    return f"{name}, {how}" + (f" + {steps} distillation steps" if steps else "")


def rows_from_sweep(run: Path) -> list[dict]:
    rows = []
    for line in (run / "results.jsonl").read_text().splitlines():
        r = json.loads(line) if line.strip() else {}
        if "metrics" not in r:
            continue
        pt = r["point"]
        command = (f"bcllm eval --layers {pt['layers']} --structure {pt.get('structure', 'circulant')} --block-size "
                   f"{pt.get('block_size', 16)} --fit {pt['fit']} --max-new-tokens 0 --prompts {PROMPTS}")
        command += "".join(f" --{k.replace('_', '-')} {pt[k]}" for k, default in (("quant_grid", "float"),
                           ("quant_damp", 0.0)) if pt.get(k, default) != default)
        rows.append(row(r["compression"], r["metrics"], r["ci"], pt["fit"], pt.get("distill_steps", 0), command))
    return rows


def row(compression, metrics, ci, fit, steps, command) -> dict:
    return {"method": method(compression, fit, steps), "structure": compression["config"]["structure"],
            "bits_per_weight": bits16(compression), "token_agreement": metrics["token_agreement"],
            "agreement_ci": ci.get("token_agreement"), "kl_mean": metrics["kl_mean"],
            "kl_recovered": metrics.get("kl_recovered"), "floor_token_agreement": metrics.get("floor_token_agreement"),
            "floor_kl_mean": metrics.get("floor_kl_mean"), "command": command}


def rows_from_evals(paths: list[Path]) -> list[dict]:
    rows = []
    for p in paths:
        d = json.loads(p.read_text())
        calib = d["compression"].get("calibration", {})
        rows.append(row(d["compression"], d["metrics"], d["ci"], d["compression"].get("fit", "?"),
                        calib.get("distill", {}).get("steps", 0), d.get("command", str(p))))
    return rows


def markdown(rows: list[dict]) -> str:
    text = ("| method on MLPs 10-19 | bits / weight | token agreement [95% CI] | KL | kl_recovered |\n"
            "| --- | ---: | --- | ---: | ---: |\n")
    for r in sorted(rows, key=lambda r: -r["bits_per_weight"]):
        ci = r["agreement_ci"]
        ci = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        rec = f"{r['kl_recovered']:.3f}" if r["kl_recovered"] is not None else ""
        text += (f"| {r['method']} | {r['bits_per_weight']:.2f} | {r['token_agreement']:.3f}{ci} | "
                 f"{r['kl_mean']:.3f} | {rec} |\n")
    floor = next((r for r in rows if r["floor_token_agreement"] is not None), None)
    if floor:
        text += (f"\nFloor (the same 30 MLPs removed): agreement {floor['floor_token_agreement']:.3f}, "
                 f"KL {floor['floor_kl_mean']:.2f}. Dense bf16 is 16 bits a weight, agreement 1.\n")
    return text


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    marks = {"quant": "o", "prune": "s", "circulant": "^", "lowrank": "v"}
    for s, mark in marks.items():
        sel = [r for r in rows if r["structure"] == s]
        if sel:
            ax.scatter([r["bits_per_weight"] for r in sel], [r["token_agreement"] for r in sel], marker=mark,
                       label=s, s=40)
    front, best = [], -1.0
    for r in sorted(rows, key=lambda r: r["bits_per_weight"]):
        if r["token_agreement"] > best:
            front.append(r)
            best = r["token_agreement"]
    ax.plot([r["bits_per_weight"] for r in front], [r["token_agreement"] for r in front], "k--", lw=0.8,
            label="Pareto front")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bits per replaced weight (float data at 16 bits)")
    ax.set_ylabel("token agreement, held-out prompts")
    ax.set_title("SmolLM2-135M, MLPs of layers 10-19")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, nargs="+", default=[Path("runs/baselines/run")],
                   help="results directories of sweeps (their results.jsonl)")
    p.add_argument("--evals", type=Path, nargs="*", default=[])
    args = p.parse_args()
    rows = [r for run in args.run for r in rows_from_sweep(run)] + rows_from_evals(args.evals)
    (OUT / "baselines.json").write_text(json.dumps(rows, indent=2) + "\n")
    (OUT / "baselines.md").write_text(markdown(rows))
    plot(rows, OUT / "baselines.png")
    print(markdown(rows))


if __name__ == "__main__":
    main()
