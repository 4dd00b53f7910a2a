"""Per-projection relative output error on held-out activations, SmolLM2-135M MLPs, at the budget
of block size 16: the aware block-circulant fit alone, after each function-preserving transform
(transforms.py), and the activation-aware low-rank fit with the same parameters.

Calibration: `mix` (500 samples, the pipeline default); held-out: src/bcllm/data/heldout_prompts.txt.
The residual permutation is shared by the layers measured (as in a student compressing them).

    .venv/bin/python scripts/transform_table.py --layers 0,12,29 --json docs/results/transform_table.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bcllm.fit.calib_text import load_calibration, make_batches
from bcllm.io.models import load_model
from bcllm.io.prompts import load_prompts
from bcllm.io.results import command_line, versions, write_json
from bcllm.ops.stats import InputStats
from bcllm.structures import LowRankConfig
from bcllm.fit.transforms import MLP, mlp_data, search_hidden, search_residual

HELDOUT = Path(__file__).resolve().parents[1] / "src/bcllm/data/heldout_prompts.txt"


def projection_errors(mlp, fits) -> list[float]:
    """Relative output error ||(W - C) X|| / ||W X|| of gate, up, down on mlp's second moments."""
    out = []
    for w, c, xx in zip(mlp.w, fits, (mlp.sx, mlp.sx, mlp.sh)):
        d = w - c
        out.append(float((((d @ xx) * d).sum() / ((w @ xx) * w).sum()).sqrt()))
    return out


def row(calib, held, ridge) -> dict:
    fits = calib.fits(ridge)
    return {"projections": projection_errors(held, fits), "mlp": held.error(fits) ** 0.5}


def lowrank_row(model, layer, calib, held, budget, ridge) -> dict:
    fits = []
    for name, w, xx in zip(MLP, calib.w, (calib.sx, calib.sx, calib.sh)):
        linear = model.model.layers[layer].mlp.get_submodule(name)
        module = LowRankConfig(budget_block_size=budget).build(name, linear)
        module.fit_(w.float(), InputStats(xx, xx, 1), ridge)
        fits.append(module.to_dense().detach().double())
    return {"projections": projection_errors(held, fits), "mlp": held.error(tuple(fits)) ** 0.5}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default="0,12,29")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--ridge", type=float, default=1e-4)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    layers = [int(i) for i in args.layers.split(",")]
    b = args.block_size
    model, tok = load_model("smollm2-135m")
    samples = load_calibration("mix", model, tok, 500, 48, 0, "smollm2-135m")
    calib = mlp_data(model, {i: b for i in layers}, make_batches(tok, samples, 8, 112))
    held = mlp_data(model, {i: b for i in layers}, make_batches(tok, load_prompts(str(HELDOUT)), 8, 256), rows=10 ** 6)
    rows = {i: {"aware": row(c, h, args.ridge), "lowrank": lowrank_row(model, i, c, h, b, args.ridge)}
            for i, c, h in zip(layers, calib, held)}
    timing = {}
    start = time.perf_counter()
    res_perm, res_history, _ = search_residual(calib, args.ridge, progress=True)
    timing["residual"] = time.perf_counter() - start
    streams = {"": (calib, held), "residual": ([c.permute_stream(res_perm) for c in calib],
                                               [h.permute_stream(res_perm) for h in held])}
    histories = {"residual": res_history}
    for prefix, (cs, hs) in streams.items():
        for rescale in (False, True):
            name = ("residual+" if prefix else "") + ("hidden perm+scale" if rescale else "hidden perm")
            for i, c, h in zip(layers, cs, hs):
                start = time.perf_counter()
                perm, scale, history, moved = search_hidden(c, args.ridge, rescale=rescale)
                timing[f"{name} {i}"] = time.perf_counter() - start
                histories[f"{name} {i}"] = history
                rows[i][name] = row(moved, h.permute_hidden(perm, scale.double()), args.ridge)
        for i, c, h in zip(layers, cs, hs):
            if prefix:
                rows[i]["residual"] = row(c, h, args.ridge)
    cols = ["aware", "hidden perm", "hidden perm+scale", "residual", "residual+hidden perm+scale", "lowrank"]
    print(f"\nrelative output error on held-out activations ({held[0].x.shape[0]} tokens), budget block size {b}\n")
    print("| layer | projection | " + " | ".join(cols) + " |\n|---|---|" + "---|" * len(cols))
    for i in layers:
        for k, proj in enumerate(MLP + ("whole MLP",)):
            vals = [rows[i][c]["projections"][k] if k < 3 else rows[i][c]["mlp"] for c in cols]
            print(f"| {i} | {proj} | " + " | ".join(f"{v:.4f}" for v in vals) + " |")
    if args.json:
        write_json(args.json, {"layers": layers, "block_size": b, "rows": rows, "histories": histories,
                               "search_s": timing, "held_out_tokens": held[0].x.shape[0],
                               "calibration_tokens_sampled": calib[0].x.shape[0], "versions": versions(),
                               "command": command_line()})


if __name__ == "__main__":
    main()
