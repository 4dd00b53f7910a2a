"""Per-layer speed of each structure at the same parameter budget, as a ratio to dense nn.Linear
measured in the same run (hot: one weight reused; cold: rotating over enough copies to exceed
the last-level cache, as in decoding). Uses bench.median_time, the timer of `bcllm bench layer`.

    .venv/bin/python scripts/structure_layer_speed.py --shape 1536x576 --budget 16 --tokens 1,16
"""

from __future__ import annotations

import argparse
import functools
import math

import torch
from torch import nn

from bcllm.bench import measure as bench
from bcllm.io.results import command_line, versions, write_json
from bcllm.fit.student import StudentSpec, config_for


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="1536x576", help="OUTxIN")
    ap.add_argument("--budget", type=int, default=16, help="circulant block size whose parameter count all get")
    ap.add_argument("--tokens", default="1,16")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    out_features, in_features = bench.parse_shape(args.shape)
    llc = bench.llc_bytes()
    dense = nn.Linear(in_features, out_features, bias=False)
    layers = {"dense": dense}
    for structure in ("circulant", "lowrank", "blockdiag", "hybrid"):
        layers[structure] = config_for(StudentSpec(structure=structure, param_budget=args.budget)).build("layer", dense)
    rows = []
    for tokens in bench.parse_ints(args.tokens, "--tokens"):
        x = torch.randn(tokens, in_features)
        times = {}
        for name, layer in layers.items():
            weight_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
            copies = [layer] + [_copy(layer) for _ in range(min(64, math.ceil(2 * llc / weight_bytes)) - 1)]
            with torch.inference_mode():
                layer(x)  # build caches (spectra) once, as at model load
                for c in copies:
                    c(x)
                hot, _ = bench.median_time([functools.partial(layer, x)], 30, 2, 3.0)
                cold, _ = bench.median_time([functools.partial(c, x) for c in copies], 30, 1, 3.0)
            times[name] = (hot, cold)
        for name, (hot, cold) in times.items():
            rows.append({"tokens": tokens, "structure": name, "hot_us": hot * 1e6, "cold_us": cold * 1e6,
                         "speedup_hot": times["dense"][0] / hot, "speedup": times["dense"][1] / cold,
                         "params": sum(p.numel() for p in layers[name].parameters())})
    print(f"shape {args.shape}, budget of circulant b={args.budget}; speedup = dense time / structure time, "
          f"same run\n")
    print("| tokens | structure | params | cold us | speedup (cold) | hot us | speedup (hot) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['structure']} | {r['params']:,} | {r['cold_us']:.0f} | {r['speedup']:.2f} | "
              f"{r['hot_us']:.0f} | {r['speedup_hot']:.2f} |")
    if args.json:
        write_json(args.json, {"shape": args.shape, "budget_block_size": args.budget, "rows": rows,
                               "versions": versions(), "command": command_line()})


def _copy(layer: nn.Module) -> nn.Module:
    """An independent copy with fresh storage, so the cold pass reads distinct weights."""
    import copy

    c = copy.deepcopy(layer)
    with torch.no_grad():
        for p in c.parameters():
            p.add_(0)  # moves the version counter: caches are rebuilt for the copy
    return c


if __name__ == "__main__":
    main()
