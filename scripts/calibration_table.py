"""Fit method x layers -> token agreement, KL, calibration time on the default prompts (issue 4 table).

    python scripts/calibration_table.py --out runs/calib_table.jsonl [--prompts FILE]
        [--runs 12:frobenius 12:aware 10-19:sequential 10-19:sequential+20 ...] [--set calib=pydoc ...]

A run is LAYERS:FIT[+DISTILL_STEPS] over a StudentSpec (defaults: block size 16, MLP targets, the
CLI's calibration); --set changes any spec field for every run. Evaluation teacher-forced (no
generation); calibration text never overlaps the prompts (checked). One JSONL record per run.
"""

import argparse
import time

import torch

from bcllm import StudentSpec, build_student
from bcllm.eval.metrics import TeacherCache, evaluate
from bcllm.io.models import load_model, model_file_identity
from bcllm.io.prompts import load_prompts
from bcllm.io.results import append_jsonl, command_line, versions

DEFAULT_RUNS = ["12:frobenius", "12:aware", "12:sequential", "10-19:frobenius", "10-19:aware", "10-19:sequential",
                "all:frobenius", "all:aware", "all:sequential"]

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--prompts", default=None, help="evaluation prompts (default: the bundled 100)")
p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS)
p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
               help="StudentSpec settings for every run, e.g. calib=pydoc block_size=8 (types as the CLI's)")
args = p.parse_args()

from bcllm.fit.student import spec_value  # noqa: E402

base = {k: spec_value(k, v) for k, v in (item.split("=", 1) for item in args.set)}
torch.manual_seed(0)
model, tok = load_model("smollm2-135m")
prompts = load_prompts(args.prompts)
teacher = TeacherCache.build(model, tok, prompts, max_new_tokens=0, model_id=model_file_identity("smollm2-135m"))
for run in args.runs:
    layers, fit = run.split(":")
    fit, _, steps = fit.partition("+")
    spec = StudentSpec(**{**base, "layers": layers, "fit": fit, "distill_steps": int(steps or 0)})
    start = time.perf_counter()
    student, summary = build_student(model, tok, spec, eval_prompts=prompts, model_id="smollm2-135m", progress=False)
    seconds = time.perf_counter() - start
    m = evaluate(student, tok, prompts, teacher=teacher, progress=False)
    rec = {"spec": spec.__dict__, "token_agreement": m["metrics"]["token_agreement"],
           "kl_mean": m["metrics"]["kl_mean"], "ci": m["ci"], "calibration": summary.get("calibration"),
           "student_s": seconds, "threads": torch.get_num_threads(), "versions": versions(), "command": command_line()}
    append_jsonl(args.out, rec)
    tokens = (summary.get("calibration") or {}).get("tokens", 0)
    print(f"{layers:>6} {run.split(':')[1]:<16} agree {rec['token_agreement']:.4f}  kl {rec['kl_mean']:.4f}  "
          f"student {seconds:.0f} s ({tokens} calibration tokens)", flush=True)
