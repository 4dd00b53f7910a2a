"""Quantization and pruning beside circulant and low-rank at equal bits per weight (issue 20).

`bcllm compare` measures such a table in one command; this script joins earlier sweeps and eval
JSONs into one, with the same rows, table and plot (bcllm.experiments.compare).

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

from bcllm.experiments.compare import markdown, method_row, plot

OUT = Path("docs/results")
PROMPTS = "src/bcllm/data/heldout_prompts.txt"


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
        rows.append(method_row(r["compression"], r["metrics"], r["ci"], pt["fit"], pt.get("distill_steps", 0), command))
    return rows


def rows_from_evals(paths: list[Path]) -> list[dict]:
    rows = []
    for p in paths:
        d = json.loads(p.read_text())
        calib = d["compression"].get("calibration", {})
        rows.append(method_row(d["compression"], d["metrics"], d["ci"], d["compression"].get("fit", "?"),
                        calib.get("distill", {}).get("steps", 0), d.get("command", str(p))))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, nargs="+", default=[Path("runs/baselines/run")],
                   help="results directories of sweeps (their results.jsonl)")
    p.add_argument("--evals", type=Path, nargs="*", default=[])
    args = p.parse_args()
    rows = [r for run in args.run for r in rows_from_sweep(run)] + rows_from_evals(args.evals)
    (OUT / "baselines.json").write_text(json.dumps(rows, indent=2) + "\n")
    (OUT / "baselines.md").write_text(markdown({"rows": rows}))
    plot(rows, OUT / "baselines.png", "SmolLM2-135M, MLPs of layers 10-19")
    print(markdown({"rows": rows}))


if __name__ == "__main__":
    main()
