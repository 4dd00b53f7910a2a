"""Recovery stages x layers -> token agreement, KL, floor and wall time, on two prompt sets (issue 11).

    python scripts/recovery_table.py --out runs/recovery.jsonl --layers 10-19 \
        --set calib=mix calib_samples=500 block_epochs=4 --distill-steps 100 [--structure lowrank --set param_budget=16]

One student is built with fit="block" and no distillation (sequential closed form, then block
reconstruction), evaluated after the sequential closed form alone is measured separately only with
--sequential; then distilled for --distill-steps and evaluated again. Every evaluation is
teacher-forced on the bundled prompts and on the held-out file (instructions, questions, prose,
code; never calibration text), with the floor (the same modules removed) beside it. One JSONL
record per stage.
"""

import argparse
import dataclasses
import time

import torch

from bcllm import StudentSpec, build_student
from bcllm.fit.calib_text import make_batches
from bcllm.fit.distill import DistillConfig, distill_
from bcllm.eval.metrics import TeacherCache, evaluate, measure_floor, with_floor
from bcllm.io.models import load_model, model_file_identity
from bcllm.fit.student import spec_value
from bcllm.io.prompts import default_prompts_path, load_prompts
from bcllm.io.results import append_jsonl, command_line, versions

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--layers", default="10-19")
p.add_argument("--structure", default="circulant")
p.add_argument("--sequential", action="store_true", help="also measure the sequential closed form alone")
p.add_argument("--distill-steps", type=int, default=100)
p.add_argument("--distill-bf16", action="store_true")
p.add_argument("--curve", nargs="*", type=int, default=[], help="also evaluate after these distillation steps")
p.add_argument("--no-default-prompts", action="store_true", help="evaluate on the held-out file only")
p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="StudentSpec settings")
args = p.parse_args()

HELDOUT = str(default_prompts_path().with_name("heldout_prompts.txt"))
base = {k: spec_value(k, v) for k, v in (item.split("=", 1) for item in args.set)}
spec = StudentSpec(**{**base, "structure": args.structure, "layers": args.layers, "fit": "block", "distill_steps": 0})
torch.manual_seed(0)
model, tok = load_model("smollm2-135m")
sets = {}
for name, path in (("default", None), ("heldout", HELDOUT))[1 if args.no_default_prompts else 0:]:
    prompts = load_prompts(path)
    sets[name] = (prompts, TeacherCache.build(model, tok, prompts, max_new_tokens=0,
                                              model_id=model_file_identity("smollm2-135m")))
floors = {}


def measure(student, stage: str, seconds: float, summary: dict, extra=None) -> None:
    rec = {"stage": stage, "layers": args.layers, "structure": args.structure, "spec": spec.__dict__,
           "stage_s": seconds, "extra": extra or {}}
    for name, (prompts, teacher) in sets.items():
        if name not in floors:
            floors[name] = measure_floor(model, summary["modules"], tok, prompts, teacher)
        m = with_floor(evaluate(student, tok, prompts, teacher, progress=False)["metrics"], floors[name])
        rec[name] = {k: m[k] for k in ("token_agreement", "kl_mean", "floor_token_agreement", "floor_kl_mean",
                                       "kl_recovered")}
    rec.update(calibration=summary.get("calibration"), versions=versions(), command=command_line())
    append_jsonl(args.out, rec)
    shown = "  ".join(f"{name} {rec[name]['token_agreement']:.3f}/{rec[name]['kl_mean']:.3f} (floor "
                      f"{rec[name]['floor_token_agreement']:.3f}/{rec[name]['floor_kl_mean']:.2f})" for name in sets)
    print(f"{args.layers:>6} {args.structure:<9} {stage:<28} {seconds:7.0f} s  {shown}", flush=True)


if args.sequential:
    start = time.perf_counter()
    student, summary = build_student(model, tok, dataclasses.replace(spec, fit="sequential"), model_id="smollm2-135m",
                                     eval_prompts=[q for prompts, _ in sets.values() for q in prompts])
    measure(student, "sequential", time.perf_counter() - start, summary)
start = time.perf_counter()
student, summary = build_student(model, tok, spec, model_id="smollm2-135m",
                                 eval_prompts=[q for prompts, _ in sets.values() for q in prompts])
layers = summary["calibration"]["block"]["layers"]
measure(student, "sequential + block", time.perf_counter() - start, summary,
        {"layer_errors": [(r["layer"], round(r["held_before"], 4), round(r["held_after"], 4)) for r in layers]})
if args.distill_steps:
    from bcllm.fit.calib_text import load_calibration

    samples = load_calibration(spec.calib, model, tok, spec.calib_samples or 500, spec.calib_tokens, 0, "smollm2-135m")
    n_held = len(samples) // 10
    train = make_batches(tok, samples[:-n_held], spec.distill_batch, spec.calib_tokens + 64)
    held = make_batches(tok, samples[-n_held:], spec.distill_batch, spec.calib_tokens + 64)
    start = time.perf_counter()
    curve = set(args.curve)

    def on_step(step, loss):  # the agreement-against-steps curve (one cosine schedule over all steps)
        if step in curve and step != args.distill_steps:
            measure(student, f"+ distill {step} of {args.distill_steps}", time.perf_counter() - start, summary)

    result = distill_(student, model, train, held, DistillConfig(steps=args.distill_steps, lr=spec.distill_lr,
                                                                 bf16=args.distill_bf16), on_step=on_step)
    measure(student, f"+ distill {args.distill_steps}", time.perf_counter() - start, summary,
            {"tokens_per_s": result["tokens_per_s"], "held_out_kl": result["held_out_kl"]})
