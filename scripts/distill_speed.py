"""Distillation throughput (tokens/s) on the same batches and settings, with and without the
cached prefix and bfloat16 autocast (issue 11: at least 3x today's).

    python scripts/distill_speed.py --layers 10-19 --steps 8 --out runs/distill_speed.json

The student is the Frobenius projection (the fit does not change the cost of a step); the
calibration batches are the default source's, distill_batch samples each. Each variant runs
`--steps` steps from the same start; tokens/s counts real (unpadded) tokens over the steps.
"""

import argparse
import copy

import torch

from bcllm import StudentSpec, build_student
from bcllm.fit.calib_text import load_calibration, make_batches
from bcllm.fit.distill import DistillConfig, distill_
from bcllm.io.models import load_model
from bcllm.io.results import command_line, versions, write_json

p = argparse.ArgumentParser()
p.add_argument("--layers", default="10-19")
p.add_argument("--steps", type=int, default=8)
p.add_argument("--out", default=None)
args = p.parse_args()

torch.manual_seed(0)
model, tok = load_model("smollm2-135m")
spec = StudentSpec(layers=args.layers)
student, _ = build_student(model, tok, spec)
samples = load_calibration(spec.calib, model, tok, spec.calib_samples or 500, spec.calib_tokens, 0, "smollm2-135m")
batches = make_batches(tok, samples, spec.distill_batch, spec.calib_tokens + 64)[: args.steps]
rows = []
for cache_prefix, bf16, vocab in ((False, False, "full"), (True, False, "full"), (False, True, "full"),
                                  (True, True, "full"), (True, False, "teacher"), (True, True, "teacher")):
    cfg = DistillConfig(steps=args.steps, eval_every=10 ** 9, checkpoint_every=10 ** 9, cache_prefix=cache_prefix,
                        bf16=bf16, vocab=vocab)
    result = distill_(copy.deepcopy(student), model, batches, (), cfg, progress=False)
    rows.append({"cache_prefix": cache_prefix, "bf16": bf16, "vocab": vocab, "vocab_size": result["vocab_size"],
                 "tokens_per_s": result["tokens_per_s"], "final_loss": result["final_loss"]})
    print(f"cache_prefix={cache_prefix!s:5} bf16={bf16!s:5} vocab={vocab:7} ({result['vocab_size']}) "
          f"{result['tokens_per_s']:7.0f} tokens/s "
          f"(x{result['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}), loss after {args.steps} steps "
          f"{result['final_loss']:.4f}", flush=True)
if args.out:
    write_json(args.out, {"rows": rows, "layers": args.layers, "steps": args.steps,
                          "tokens_per_batch": [int(b["attention_mask"].sum()) for b in batches],
                          "threads": torch.get_num_threads(), "versions": versions(), "command": command_line()})
