"""Which distillation data generalises? One block-reconstructed student (SmolLM2, MLPs of layers
10-19, block size 16), then distillation from it with each data source at the same settings, the
agreement and KL on the held-out prompt file recorded along the way (the curve over tokens).

    python scripts/recovery_sources.py --steps 150 --out docs/results/recovery_sources.json
    python scripts/recovery_sources.py --only teacher-onpolicy     # one run, appended to the file
    python scripts/recovery_sources.py --report                    # table + curve plot from the JSON

Sources: mix (today's default: 96 self-chat samples + pydoc), teacher (the teacher's replies to
the bundled seeds), teacher-onpolicy (the same, a quarter of the steps on the student's own
continuations of the seeds), and divergences on teacher data. The starting student is built once
and saved (--base); each run is written to the JSON as it finishes (a rerun skips finished runs).
"""

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

RUNS = {  # name: (calibration source, divergence, on-policy share)
    "mix": ("mix", "forward", 0.0),
    "teacher": ("teacher", "forward", 0.0),
    "teacher-onpolicy": ("teacher", "forward", 0.25),
    "teacher-jsd": ("teacher", "jsd", 0.0),
    "teacher-reverse": ("teacher", "reverse", 0.0),
    "teacher-skew": ("teacher", "skew", 0.0),
    "teacher-onpolicy-jsd": ("teacher", "jsd", 0.25),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--layers", default="10-19")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--structure", default="circulant")
    p.add_argument("--only", nargs="*", default=["mix", "teacher", "teacher-onpolicy"], choices=list(RUNS))
    p.add_argument("--base", default="runs/recovery_base", help="the block-reconstructed starting student")
    p.add_argument("--out", default="docs/results/recovery_sources.json")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--report", action="store_true", help="write the table and the plot from --out, run nothing")
    args = p.parse_args()
    if args.report:
        return report(Path(args.out))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bcllm import StudentIO, StudentSpec, build_student, load_model
    from bcllm.fit.calib_text import load_calibration, overlapping
    from bcllm.fit.distill import DistillConfig
    from bcllm.fit.student import fit_student_, prompt_curve
    from bcllm.fit.teacher_text import TURN, load_seeds, student_continuations
    from bcllm.io.prompts import HELDOUT_PROMPTS, load_prompts

    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    prompts = load_prompts(HELDOUT_PROMPTS)
    spec = StudentSpec(structure=args.structure, block_size=args.block_size, layers=args.layers, fit="block",
                       calib="teacher", calib_samples=100_000, fit_samples=500, distill_steps=0)
    base = Path(args.base + ("" if args.structure == "circulant" else f"-{args.structure}"))
    start = time.perf_counter()
    io = StudentIO(load=str(base)) if (base / "fitted.json").exists() else StudentIO(save=str(base))
    student, summary = build_student(model, tok, spec, io, eval_prompts=prompts, model_id="smollm2-135m")
    base_s = time.perf_counter() - start
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    result.update(command=" ".join(sys.argv), base_spec=spec.point(), base_seconds=base_s, steps=args.steps,
                  versions={"torch": torch.__version__, "python": platform.python_version()})
    for name in args.only:
        key = f"{name}@{args.steps}" + ("" if args.structure == "circulant" else f"-{args.structure}")
        if key in result["runs"]:
            continue
        source, kind, share = RUNS[name]
        samples = load_calibration(source, model, tok, 100_000 if source == "teacher" else 500, 48, 0, "smollm2-135m")
        bad = set(overlapping(samples, prompts))
        samples = [s for i, s in enumerate(samples) if i not in bad]
        s = copy.deepcopy(student)
        cfg = DistillConfig(steps=args.steps, lr=args.lr, eval_every=args.eval_every, divergence=kind, onpolicy=share)
        on_policy = student_continuations(s, tok, [x.split(TURN)[0] for x in load_seeds()], 8, 112) if share else None
        t = time.perf_counter()
        info = fit_student_(s, model, tok, samples, "frobenius", max_length=112, batch_size=8, distill=cfg,
                            on_policy=on_policy, on_eval=prompt_curve(s, model, tok, prompts))
        run = {"source": source, "divergence": kind, "onpolicy": share, "samples": len(samples),
               "seconds": time.perf_counter() - t, "distill": info["distill"]}
        result["runs"][key] = run
        last = run["distill"]["curve"][-1]
        print(f"{key}: agreement {last['token_agreement']:.4f}, KL {last['kl_mean']:.4f} after "
              f"{last['tokens']:,} tokens, {run['seconds']:.0f} s", flush=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, out)


def report(path: Path) -> None:
    """<out>.md (the table: held-out agreement / KL at the start and end of each run, tokens, time)
    and <out>.png (agreement against distillation tokens, one line per run)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.loads(path.read_text())
    lines = [f"# Distillation data: which source generalises to held-out prompts", "",
             f"`{result['command']}`: one block-reconstructed student (SmolLM2-135M, MLPs of layers 10-19, block "
             f"size 16, fit on the first 500 teacher-written samples in {result['base_seconds']:.0f} s), then "
             f"{result['steps']} distillation steps (batch 8, lr 1e-3, cosine) from it with each source. Agreement "
             f"and KL: teacher-forced on `src/bcllm/data/heldout_prompts.txt` (100 prompts, 2,540 positions), "
             f"as `bcllm eval` measures them.", "",
             "| run | source | divergence | on-policy share | distillation tokens | agreement start -> end | KL start -> end | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, run in result["runs"].items():
        curve = run["distill"]["curve"]
        first, last = curve[0], curve[-1]
        lines.append(f"| {key} | {run['source']} | {run['divergence']} | {run['onpolicy']} | {last['tokens']:,} | "
                     f"{first['token_agreement']:.3f} -> **{last['token_agreement']:.3f}** | "
                     f"{first['kl_mean']:.3f} -> **{last['kl_mean']:.3f}** | {run['seconds']:.0f} |")
        ax.plot([c["tokens"] for c in curve], [c["token_agreement"] for c in curve], marker="o", label=key)
    ax.set_xlabel("distillation tokens")
    ax.set_ylabel("token agreement, held-out prompts")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
    lines += ["", f"![agreement against distillation tokens]({path.with_suffix('.png').name})", ""]
    path.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
