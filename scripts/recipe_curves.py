"""Held-out agreement and KL against distillation tokens, from `bcllm eval --curve --json` files.

    python scripts/recipe_curves.py runs/long/eval_long_circulant.json runs/long/eval_long_lowrank.json \
        --out docs/results/long_recipe

writes OUT.png (the curves) and OUT.json (the curves and each run's final figures and command).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(path: Path) -> dict:
    d = json.loads(path.read_text())
    calib = d["compression"]["calibration"]
    sizes = next(iter(d["compression"]["sizes"].values()))
    label = f"{d['compression']['config']['structure']} ({', '.join(f'{k} {v}' for k, v in sizes.items())})"
    return {"label": label, "curve": calib["distill"]["curve"], "final": {k: d["metrics"][k] for k in
            ("token_agreement", "kl_mean", "kl_recovered")}, "ci": d["ci"], "steps": calib["distill"]["steps"],
            "distill_tokens": calib["distill"]["distill_tokens"], "seconds": d["timing"]["total_s"],
            "command": d.get("command")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    runs = [load(f) for f in args.files]
    args.out.with_suffix(".json").write_text(json.dumps(runs, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, k) = plt.subplots(1, 2, figsize=(10, 4))
    for r in runs:
        tokens = [c["tokens"] / 1000 for c in r["curve"]]
        a.plot(tokens, [c["token_agreement"] for c in r["curve"]], marker="o", ms=3, label=r["label"])
        k.plot(tokens, [c["kl_mean"] for c in r["curve"]], marker="o", ms=3, label=r["label"])
    for ax, name in ((a, "token agreement"), (k, "KL (teacher || student)")):
        ax.set_xlabel("distillation tokens (thousands)")
        ax.set_ylabel(f"held-out {name}")
        ax.grid(alpha=0.3)
    a.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M, MLPs 10-19, --recipe long (400 steps): held-out prompts during distillation")
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    for r in runs:
        print(f"{r['label']}: {r['final']['token_agreement']:.3f} / {r['final']['kl_mean']:.3f} after "
              f"{r['distill_tokens']:,} tokens, {r['seconds'] / 60:.0f} min")


if __name__ == "__main__":
    main()
