"""Per-layer relative output error ||(W - W_hat) X|| / ||W X|| of each structure at the same
parameter budget, on held-out activations of SmolLM2-135M.

Calibration: natural-text chunks of pydoc_data.topics, or any `bcllm eval --calib` source
(never the evaluation prompts); held-out X: the bundled 100 default prompts. Every structure gets the parameter count of a
block-circulant of block size --budget on each layer, fitted plainly (Frobenius / SVD /
diagonal blocks) and activation-aware (calibrate.InputStats, ridge --ridge).

    .venv/bin/python scripts/structure_layer_error.py --budget 16 --json out/structure_layer_error.json
"""

from __future__ import annotations

import argparse
import os
import time

import pydoc_data.topics
import torch

from bcllm.fit.calib_text import load_calibration, make_batches
from bcllm.fit.closed_form import InputStats
from bcllm.io.models import load_model
from bcllm.structures import BlockCirculantLinear
from bcllm.io.prompts import load_prompts
from bcllm.io.results import command_line, versions, write_json
from bcllm.structures import BlockDiagonalConfig, HybridConfig, LowRankConfig
from bcllm.structures import CirculantConfig

LAYERS = ["model.layers.12.mlp.gate_proj", "model.layers.12.mlp.up_proj", "model.layers.12.mlp.down_proj",
          "model.layers.29.mlp.down_proj"]


def calibration_batches(args, model, tokenizer) -> list[dict]:
    """pydoc-chunks: consecutive chunks of pydoc_data.topics; anything else: a --calib source of bcllm eval."""
    if args.calib == "pydoc-chunks":
        text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return [{"input_ids": torch.tensor([ids[i * args.chunk_len:(i + 1) * args.chunk_len]])}
                for i in range(args.chunks)]
    samples = load_calibration(args.calib, model, tokenizer, args.calib_samples, args.calib_tokens, 0, "smollm2-135m")
    return make_batches(tokenizer, samples, 8, args.calib_tokens)


@torch.no_grad()
def layer_inputs(model, batches) -> dict[str, torch.Tensor]:
    """Rows (N, in) of the inputs each of LAYERS sees over `batches`."""
    rows = {n: [] for n in LAYERS}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, args, out, n=n: rows[n].append(args[0].reshape(-1, args[0].shape[-1]).float())) for n in LAYERS]
    try:
        for batch in batches:
            mask = batch.get("attention_mask")
            before = {n: len(r) for n, r in rows.items()}
            model.model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False)
            if mask is not None:  # keep the real (unpadded) positions only
                for n, r in rows.items():
                    r[before[n]] = r[before[n]][mask.reshape(-1).bool()]
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=int, default=16, help="circulant block size whose parameter count all get")
    ap.add_argument("--calib", default="pydoc-chunks", help="pydoc-chunks, or a --calib source of bcllm eval")
    ap.add_argument("--calib-samples", type=int, default=96)
    ap.add_argument("--calib-tokens", type=int, default=48)
    ap.add_argument("--chunks", type=int, default=32, help="pydoc-chunks: chunks of --chunk-len tokens")
    ap.add_argument("--chunk-len", type=int, default=256)
    ap.add_argument("--ridge", type=float, default=1e-4)
    ap.add_argument("--json")
    ap.add_argument("--cache", help="keep the collected activations in this .pt file (reused when it exists)")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2-135m")
    if args.cache and os.path.exists(args.cache):
        calib, held = torch.load(args.cache)
    else:
        calib = layer_inputs(model, calibration_batches(args, model, tokenizer))
        held = layer_inputs(model, [{"input_ids": torch.tensor([tokenizer(p)["input_ids"]])} for p in load_prompts()])
        if args.cache:
            torch.save((calib, held), args.cache)
    b = args.budget
    structures = {"circulant": CirculantConfig(block_size=b), "lowrank": LowRankConfig(budget_block_size=b),
                  "blockdiag": BlockDiagonalConfig(budget_block_size=b), "hybrid": HybridConfig(budget_block_size=b)}
    rows = []
    for name in LAYERS:
        linear = model.get_submodule(name)
        w = linear.weight.detach()
        x = calib[name].double()
        stats = InputStats(xx=x.T @ x, xt=x.T @ x, n=x.shape[0])
        x_held = held[name]
        y = x_held @ w.T
        row = {"layer": name, "calibration_tokens": x.shape[0], "held_out_tokens": x_held.shape[0]}
        for structure, cfg in structures.items():
            module = cfg.build(name, linear)
            size = {k: getattr(module, k) for k in ("block_size", "rank", "num_blocks") if hasattr(module, k)}
            row[f"{structure}_size"] = size
            row[f"{structure}_params"] = sum(p.numel() for p in module.parameters())
            for fit in ("plain", "aware"):
                t = time.perf_counter()
                if fit == "aware":
                    module.fit_(w, stats, args.ridge)
                err = (x_held @ module.to_dense().detach().float().T - y).norm() / y.norm()
                row[f"{structure}_{fit}"] = float(err)
                row[f"{structure}_{fit}_s"] = time.perf_counter() - t
        row["dense_params"] = w.numel()
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if not k.endswith("_s")},
              flush=True)

    print(f"\nrelative output error on held-out prompts, budget = circulant b={b} "
          f"(calibration {rows[0]['calibration_tokens']} tokens of {args.calib}, ridge {args.ridge})\n")
    heads = [f"{s} {f}" for s in structures for f in ("plain", "aware")]
    print("| layer | " + " | ".join(heads) + " |")
    print("|---" * (len(heads) + 1) + "|")
    for r in rows:
        print(f"| {r['layer'].replace('model.layers.', '')} | "
              + " | ".join(f"{r[f'{s}_{f}']:.3f}" for s in structures for f in ("plain", "aware")) + " |")
    print("\nsizes: " + "; ".join(f"{s} {rows[0][f'{s}_size']} = {rows[0][f'{s}_params']:,} params"
                                 for s in structures) + f" (dense {rows[0]['dense_params']:,})")
    if args.json:
        write_json(args.json, {"budget_block_size": b, "ridge": args.ridge, "calib": args.calib, "rows": rows,
                               "versions": versions(), "command": command_line()})


if __name__ == "__main__":
    main()
