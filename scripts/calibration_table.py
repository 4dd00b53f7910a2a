"""Fit method x layers -> token agreement, KL, calibration time on the default prompts (issue 4 table).

    python scripts/calibration_table.py --out runs/calib_table.jsonl [--calib self-chat] [--samples 96]
        [--runs 12:frobenius 12:aware 10-19:sequential 10-19:sequential+20 ...]

A run is LAYERS:FIT[+DISTILL_STEPS]. Block size 16, MLP targets. Evaluation teacher-forced on the 100
default prompts (no generation); calibration text never overlaps them (checked). One JSONL record per run.
"""

import argparse
import copy
import time

import torch

from bcllm.calib_data import check_overlap, load_calibration
from bcllm.calibrate import calibrate_student
from bcllm.distill import DistillConfig
from bcllm.evaluate import TeacherCache, evaluate, model_file_identity
from bcllm.models import load_model
from bcllm.prompts import load_prompts
from bcllm.results import append_jsonl, command_line, versions
from bcllm.surgery import CirculantConfig, compress_

DEFAULT_RUNS = ["12:frobenius", "12:aware", "12:sequential", "10-19:frobenius", "10-19:aware", "10-19:sequential",
                "all:frobenius", "all:aware", "all:sequential"]

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--calib", default="self-chat")
p.add_argument("--samples", type=int, default=96)
p.add_argument("--tokens", type=int, default=48, help="new tokens per self-generated sample")
p.add_argument("--max-length", type=int, default=96)
p.add_argument("--block-size", type=int, default=16)
p.add_argument("--distill-lr", type=float, default=1e-3)
p.add_argument("--distill-batch", type=int, default=8)
p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS)
args = p.parse_args()

torch.manual_seed(0)
model, tok = load_model("smollm2-135m")
prompts = load_prompts(None)
teacher = TeacherCache.build(model, tok, prompts, max_new_tokens=0, model_id=model_file_identity("smollm2-135m"))
samples = load_calibration(args.calib, model, tok, args.samples, args.tokens, 0, "smollm2-135m")
check_overlap(samples, prompts)
for run in args.runs:
    layers, fit = run.split(":")
    fit, _, steps = fit.partition("+")
    student = copy.deepcopy(model)
    compress_(student, CirculantConfig(args.block_size, "mlp", layers))
    distill = DistillConfig(steps=int(steps), lr=args.distill_lr, eval_every=max(1, int(steps) // 4),
                            checkpoint_every=10 ** 9) if steps else None
    start = time.perf_counter()
    info = calibrate_student(student, model, tok, samples, fit, max_length=args.max_length,
                             batch_size=args.distill_batch, distill=distill, progress=False)
    info["calibration_s"] = time.perf_counter() - start
    m = evaluate(student, tok, prompts, teacher=teacher, progress=False)
    rec = {"layers": layers, "fit": fit, "distill_steps": int(steps or 0), "calib": args.calib,
           "block_size": args.block_size, "token_agreement": m["metrics"]["token_agreement"],
           "kl_mean": m["metrics"]["kl_mean"], "ci": m["ci"], "calibration": info,
           "threads": torch.get_num_threads(), "versions": versions(), "command": command_line()}
    append_jsonl(args.out, rec)
    print(f"{layers:>6} {run.split(':')[1]:<16} agree {rec['token_agreement']:.4f}  kl {rec['kl_mean']:.4f}  "
          f"calib {info['calibration_s']:.0f} s ({info['tokens']} tokens)", flush=True)
