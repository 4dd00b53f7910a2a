"""Is torchao's int8 weight-only quantization faster than dense at decode on this CPU? (issue 20)

A user who wants fewer weight bytes on a CPU reaches for torchao first. This times one row through
a dense nn.Linear (float32 and bfloat16), the same layer after torchao's `quantize_(...,
Int8WeightOnlyConfig())` on a float32 and on a bfloat16 copy, eager and through torch.compile,
and PyTorch's own int8 weight-only kernel (torch._weight_int8pack_mm, the int8 column of `bcllm
bench layer`) with float32 and bfloat16 activations, all in one process, hot (one weight, the same
call repeated): the weights of one layer fit or nearly fit the caches, which flatters the dense side
least. torchao is an optional install (`pip install --no-deps torchao==0.18.0`); not part of bcllm.

    python scripts/torchao_int8_speed.py [--shapes 1536x576,4096x4096,11008x4096] [--json docs/results/torchao_int8_speed.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")  # its CUDA-only extensions: noise on a CPU

import torch  # noqa: E402

from bcllm.bench.measure import int8_dense_product, int8_weight_only, parse_shape  # noqa: E402
from bcllm.io.results import versions  # noqa: E402
from bcllm.structures.quantized import int8_decode_fits  # noqa: E402


def median_us(fn, x, repeats: int = 7, calls: int = 20) -> float:
    with torch.inference_mode():
        for _ in range(3):
            fn(x)
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                fn(x)
            runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1536x576,4096x4096,11008x4096")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    try:
        import torchao
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        sys.exit("torchao is not installed: pip install --no-deps torchao==0.18.0")
    torch.manual_seed(0)
    rows = []
    for out_f, in_f in map(parse_shape, args.shapes.split(",")):
        dense = torch.nn.Linear(in_f, out_f, bias=False)
        ao = copy.deepcopy(dense)
        quantize_(ao, Int8WeightOnlyConfig())
        ao16 = copy.deepcopy(dense).bfloat16()  # torchao on a bfloat16 model (its CPU int8 path's dtype)
        quantize_(ao16, Int8WeightOnlyConfig())
        codes, scales = int8_weight_only(dense.weight.detach())
        x = torch.randn(1, in_f)
        x16 = x.bfloat16()
        with torch.inference_mode():
            ref = dense(x)
            ao_err = ((ao(x) - ref).abs().max() / ref.abs().max()).item()
        if int8_dense_product(x16, codes, scales.bfloat16()) is None or not int8_decode_fits(in_f):
            sys.exit(f"{out_f}x{in_f}: PyTorch's int8 kernel does not run here (no kernel, or inputs not in 32s)")
        row = {"shape": f"{out_f}x{in_f}", "dense_us": median_us(dense, x),
               "dense_bf16_us": median_us(copy.deepcopy(dense).bfloat16(), x16),
               "torchao_int8_us": median_us(ao, x), "torchao_int8_bf16_us": median_us(ao16, x16),
               "torch_int8pack_us": median_us(lambda v: int8_dense_product(v, codes, scales), x),
               "torch_int8pack_bf16_us": median_us(lambda v: int8_dense_product(v, codes, scales.bfloat16()), x16),
               "torchao_rel_error": ao_err}
        if not args.no_compile:
            row["dense_compiled_us"] = median_us(torch.compile(dense), x)
            row["torchao_int8_compiled_us"] = median_us(torch.compile(ao), x)
            row["torchao_int8_bf16_compiled_us"] = median_us(torch.compile(ao16), x16)
        rows.append(row)
        print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    out = {"rows": rows, "command": " ".join(sys.argv), "versions": {**versions(), "torchao": torchao.__version__}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
