"""The `bcllm` command line. Each subcommand is a `cmd_*` function; options shared
by several commands are added by the `add_*_args` helpers so they read the same
everywhere. Arguments become a pipeline.StudentSpec (what the student is) and a
pipeline.StudentIO (where its files go); the library does the rest. Bad input is an
errors.InputError naming a library parameter: `main` turns it into the flag and exit
status 2; every other exception keeps its traceback."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import sys
from pathlib import Path

from .. import __version__, dist
from ..errors import InputError
from ..io.results import structured_params

# Library parameter -> the flag that sets it, where the flag is not simply --param-name.
PARAM_FLAGS = {"budget_block_size": "--param-budget", "num_blocks": "--param-budget", "grid_file": "--grid-file",
               "budget": "--budget", "out": "--out", "student_dir": "STUDENT_DIR", "out_dir": "OUT_DIR",
               "folder": "--load"}


def flag_for(param: str) -> str:
    return PARAM_FLAGS.get(param, "--" + param.replace("_", "-"))


def usage_message(error: InputError) -> str:
    """The library's message with its parameter named as the flag that sets it."""
    message = str(error)
    if not error.param:
        return message
    flag = flag_for(error.param)
    if re.match(rf"{re.escape(error.param)}\b", message):
        return flag + message[len(error.param):]
    return f"{flag}: {message}"


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="embedded name (smollm2-135m; gemma3-270m, qwen2.5-0.5b, qwen2.5-1.5b with their extras), "
                        ".gguf file, HF folder or cached HF id")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0, ...")
    p.add_argument("--seed", type=int, default=0)


def add_compress_args(p: argparse.ArgumentParser) -> None:
    """The StudentSpec options; their defaults are the spec's own (pipeline.StudentSpec)."""
    from ..fit.student import StudentSpec as D
    from ..structures.base import STRUCTURES

    p.add_argument("--structure", default=D.structure, choices=list(STRUCTURES),
                   help="what replaces each dense layer: block-circulant, low-rank U V, block-diagonal, or "
                        "circulant + low-rank; the others get the parameter count of circulant --block-size")
    p.add_argument("--block-size", type=int, default=D.block_size, help="circulant block size b")
    p.add_argument("--rank", type=int, default=None, help="low-rank rank (lowrank; hybrid: plus circulant --block-size)")
    p.add_argument("--param-budget", type=int, default=None, metavar="B",
                   help="give every structure the parameter count of a block-circulant of block size B")
    p.add_argument("--block-sizes", default=D.block_sizes, metavar="GLOB=B,...",
                   help="per-module block sizes (circulant) or budget block sizes (lowrank), first match wins, "
                        "e.g. '*.layers.3.mlp.*=4,down_proj=32'; the rest get --block-size")
    p.add_argument("--spectra-bits", type=int, default=D.spectra_bits, choices=[32, 8],
                   help="circulant: store the spectra as float32 (32) or int8 codes with a float32 scale per "
                        "frequency and output block (8: a quarter of the bytes; the fits and distillation see the "
                        "rounded spectra; with --load, a saved student's spectra rounded after the fact)")
    p.add_argument("--transform", default=D.transform, choices=["none", "hidden", "residual", "both"],
                   help="circulant MLPs: first reorder (and rescale) channels without changing the dense "
                        "model's function, searched to bring the weights closer to block-circulant: hidden = "
                        "each MLP's intermediate channels, residual = the residual stream, both")
    p.add_argument("--quant-grid", default=D.quant_grid, choices=["float", "int"],
                   help="quant: the min..max grid with a float zero point (llama.cpp Q4_1, torchao) or GPTQ's "
                        "grid that holds 0 exactly (integer zero point)")
    p.add_argument("--quant-damp", type=float, default=D.quant_damp,
                   help="quant with --fit aware or sequential (GPTQ): damping relative to the mean Gram diagonal, "
                        "the larger of it and --ridge (GPTQ's own default: 0.01)")
    p.add_argument("--layers", default=D.layers, help="decoder layers: all, 10-19, 0,3,5")
    p.add_argument("--targets", default=D.targets,
                   help="comma-separated module suffixes, globs, or shorthands mlp / attn")
    from ..fit.student import FITS

    p.add_argument("--fit", default=D.fit, choices=FITS,
                   help="how the structured weights are fitted: frobenius = nearest in Frobenius norm; aware = "
                        "least squares on the calibration inputs; sequential = layer by layer on the inputs of "
                        "the already compressed model (compensates upstream error); block = the recovery recipe: "
                        "sequential, then each layer's structured modules trained together through the "
                        "nonlinearity on cached activations, then logit distillation")
    add_calib_args(p)


def add_distill_args(g) -> None:
    """The distillation options, into the calibration group `g`."""
    from ..fit.student import StudentSpec as D

    g.add_argument("--distill-steps", type=int, default=None, metavar="N",
                   help="logit distillation steps after the fit (default: 100 with --fit block, else 0)")
    g.add_argument("--recipe", choices=["long"], default=None,
                   help="long: --fit block with 400 distillation steps (about an hour on 2 cores for ten MLPs; "
                        "the default block recipe runs 100)")
    g.add_argument("--distill-lr", type=float, default=D.distill_lr)
    g.add_argument("--distill-batch", type=int, default=D.distill_batch, help="samples per calibration batch (fit and distillation)")
    g.add_argument("--hidden-mse", type=float, default=D.hidden_mse, help="weight of the per-layer hidden-state MSE term")
    g.add_argument("--train-norms", action="store_true", help="distillation also trains biases and norm weights")
    g.add_argument("--distill-bf16", action="store_true",
                   help="distil with the student's forward under bfloat16 autocast (faster on CPUs with AMX)")
    g.add_argument("--distill-vocab", default=D.distill_vocab, choices=["auto", "full", "teacher"],
                   help="distil over the full vocabulary, or over the tokens in the teacher's top-k anywhere in "
                        "the batch (fewer output logits a step; forward KL without on-policy steps); auto: teacher "
                        "where it applies")
    g.add_argument("--distill-divergence", default=D.distill_divergence, choices=["forward", "reverse", "jsd", "skew"],
                   help="forward KL(teacher||student) on the teacher's top-k (cached), or a full-vocabulary reverse "
                        "KL, generalised JSD (beta 0.5) or skew KL (0.1), the teacher run each step")
    g.add_argument("--distill-onpolicy", type=float, default=D.distill_onpolicy, metavar="SHARE",
                   help="share of distillation steps on the student's own continuations of seed prompts, scored "
                        "by the teacher (on-policy, GKD)")
    g.add_argument("--adapter-rank", type=int, default=D.adapter_rank, metavar="R",
                   help="distillation also trains a rank-R correction of every dense linear from the first "
                        "compressed layer on (recovery LoRA), merged into its weight afterwards: no parameters "
                        "or time added to the student (default 0: off)")
    g.add_argument("--curve", action="store_true",
                   help="record token agreement and KL on the evaluation prompts at every held-out evaluation of "
                        "distillation (the JSON's curve; monitoring only)")


def add_calib_args(p: argparse.ArgumentParser) -> None:
    from ..fit.student import StudentSpec as D

    g = p.add_argument_group("calibration (--fit aware/sequential/block, --distill-steps) and fitted students")
    g.add_argument("--calib", default=D.calib, metavar="SOURCE",
                   help="calibration text: teacher (the model's replies to about 2,000 bundled seed "
                        "instructions, questions, code and story openings; written once, cached), mix (96 samples the model writes itself plus all of Python's offline "
                        "reference text, prose and code; works on any model), a file (one sample a line), "
                        "self-chat (the model writes instructions and answers them; cached), self-seed (the "
                        "model continues short seeds), pydoc (the reference prose paragraphs) or pydoc-all "
                        "(all of it, code included)")
    g.add_argument("--calib-samples", type=int, default=D.calib_samples, metavar="N",
                   help="number of calibration samples (default: all of teacher, 500 of the others)")
    g.add_argument("--calib-tokens", type=int, default=D.calib_tokens, metavar="T",
                   help="new tokens per self-generated sample; every sample is cut to T + 64 tokens")
    g.add_argument("--ridge", type=float, default=D.ridge, help="ridge of the least-squares fits, relative to the Gram diagonal")
    g.add_argument("--force-overlap", action="store_true",
                   help="calibrate even when the calibration text overlaps the evaluation prompts")
    add_distill_args(g)
    g.add_argument("--fit-samples", type=int, default=D.fit_samples, metavar="N",
                   help="the fit (aware, sequential, block) on the first N calibration samples; distillation "
                        "uses them all (default %(default)s)")
    g.add_argument("--block-epochs", type=int, default=D.block_epochs, help="--fit block: epochs over the cached activations")
    g.add_argument("--block-lr", type=float, default=D.block_lr, help="--fit block: Adam learning rate")
    g.add_argument("--block-target", default=D.block_target, choices=["mlp", "layer"],
                   help="--fit block: fit the dense MLP on the student's inputs, or the teacher's decoder-layer "
                        "output (attention included)")
    g.add_argument("--block-batch-tokens", type=int, default=D.block_batch_tokens, help="--fit block: token rows per step")
    g.add_argument("--distill-dir", metavar="DIR",
                   help="checkpoints here: each finished layer of --fit block (DIR/block) and the distillation "
                        "(with --resume: continue; a sweep keeps one subfolder per point)")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from --distill-dir: after its last finished block-fit layer, "
                        "then from its last distillation checkpoint (a checkpoint of another run is refused)")
    g.add_argument("--save", metavar="DIR", help="save the fitted structured modules (safetensors + JSON)")
    g.add_argument("--load", metavar="DIR", help="load a student saved with --save instead of fitting one")


def spec_from_args(args):
    """The StudentSpec and StudentIO that parsed arguments describe, checked before any model loads."""
    from ..fit.student import RECIPES, StudentIO, StudentSpec, config_for

    if getattr(args, "recipe", None):
        if args.fit not in ("block", StudentSpec.fit) or args.distill_steps is not None:
            raise InputError(f"--recipe {args.recipe} sets --fit block and the distillation steps; drop --fit "
                             f"{args.fit} / --distill-steps", "recipe")
        args.fit, args.distill_steps = "block", RECIPES[args.recipe]
    spec = StudentSpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(StudentSpec)})
    io = StudentIO(**{f.name: getattr(args, f.name) for f in dataclasses.fields(StudentIO)})
    config_for(spec)  # the size options must make a config
    return spec, io


def student_from_args(args, spec_io, model, tokenizer, eval_prompts=None):
    """(student, summary) of the parsed arguments: pipeline.build_student."""
    from ..fit.student import build_student

    spec, io = spec_io
    return build_student(model, tokenizer, spec, io, eval_prompts=eval_prompts, model_id=args.model)


def args_config(args, drop=("json",)) -> dict:
    """The parsed options as a result file records them: all but the handler, the subcommand name
    and `drop`."""
    return {k: v for k, v in vars(args).items() if k not in ("func", "command", *drop)}


def print_summary(summary: dict) -> None:
    print(f"replaced {summary['num_modules']} modules: {summary['replaced_params']:,} dense parameters -> "
          f"{structured_params(summary):,} ({summary['ratio']:.1f}x fewer); "
          f"model {summary['model_params_before']:,} -> {summary['model_params_after']:,}")
    config = summary.get("config", {})
    if summary.get("budget_params"):  # a non-circulant structure sized to a circulant's parameter count
        sizes = sorted({tuple(s.items()) for s in summary["sizes"].values()})
        shown = "; ".join(", ".join(f"{k} {v}" for k, v in s) for s in sizes)
        print(f"{config['structure']} sizes ({shown}): {structured_params(summary):,} parameters, budget "
              f"{summary['budget_params']:,} (circulant block size {config['budget_block_size']})")
    cal = summary.get("calibration")
    if cal:
        fitted = f"{cal['fit_tokens']:,} of " if cal.get("fit_tokens", cal["tokens"]) != cal["tokens"] else ""
        line = (f"fit {cal['fit']} on {cal['samples']} {cal['calib']} samples ({fitted}{cal['tokens']:,} tokens): "
                f"{cal['fit_s']:.1f} s")
        if "distill" in cal:
            held = cal["distill"]["held_out_kl"]
            line += (f"; distilled {cal['distill']['steps']} steps in {cal['distill_s']:.0f} s, final loss "
                     f"{cal['distill']['final_loss']:.4f}" + (f", held-out KL {held[-1][1]:.4f}" if held else ""))
        print(line)


def cmd_compress(args) -> None:
    import time

    import torch

    from ..io.models import load_model

    torch.manual_seed(args.seed)
    spec_io = spec_from_args(args)
    t = time.perf_counter()
    if args.stream:
        from ..eval.student import streamed_student

        summary, _, _ = streamed_student(args.model, *spec_io, dtype=args.dtype, device=args.device)
        print_stream(summary["stream"])
    else:
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
        t = time.perf_counter()
        _, summary = student_from_args(args, spec_io, model, tokenizer)  # with --fit/--distill-steps/--save: calibrate and save
    print_summary(summary)
    print(f"building the student took {time.perf_counter() - t:.2f} s")


# eval/generate default to one middle layer: a quick, readable first measurement (see README).
EVAL_DEFAULT_LAYERS = "12"


def add_stream_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stream", action="store_true",
                   help="models bigger than memory: keep one decoder layer (plus embeddings and head) loaded at a "
                        "time, read from the model's safetensors; --fit frobenius/aware/sequential, or block with "
                        "--distill-steps 0; --calib pydoc-all, pydoc or a file; eval: --max-new-tokens 0")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens per prompt for generation agreement")
    p.add_argument("--chat", action="store_true", help="format prompts with the model's chat template")


def plain_warnings() -> None:
    """Show warnings meant for the user (e.g. a truncated prompt) as one line, without source lines."""
    import warnings

    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"


def check_max_new_tokens(n: int) -> None:
    if n < 0:
        raise InputError(f"--max-new-tokens must be >= 0, got {n}")


def check_device(name: str) -> None:
    """A bad --device as one line before the model loads (torch raises RuntimeError/AssertionError)."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown --device {name!r}: use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available to this torch ({torch.__version__})")


def cmd_eval(args) -> None:
    from ..eval.student import evaluate_student
    from ..io.results import check_writable, command_line, write_json

    plain_warnings()
    json_path = check_writable(args.json) if args.json else None  # fail before the long work
    check_max_new_tokens(args.max_new_tokens)
    check_device(args.device)
    spec, io = spec_from_args(args)
    record = evaluate_student(args.model, spec, io, prompts=args.prompts, max_new_tokens=args.max_new_tokens,
                              stream=args.stream, chat=args.chat, seed=args.seed, dtype=args.dtype, device=args.device)
    print_eval(args, record, record["compression"], record["timing"])
    if json_path:
        config = {**args_config(args), "prompts": record["prompts"]}
        keys = ("metrics", "ci", "compression", "per_prompt", "num_prompts", "num_positions", "teacher_cache",
                "timing", "versions", "decode_kernel")
        write_json(json_path, {"model": args.model, "config": config, **{k: record[k] for k in keys},
                               "command": command_line()})
        print(f"wrote {json_path}")


def print_stream(stream: dict) -> None:
    mb = 1 / 2 ** 20
    print(f"streamed: at most {stream['peak_bytes'] * mb:,.1f} MiB of parameters loaded at once "
          f"(whole model {stream['model_bytes'] * mb:,.1f} MiB)")


def print_eval(args, result: dict, summary: dict, timing: dict) -> None:
    m, ci = result["metrics"], result["ci"]

    def num(v):
        return "n/a" if v is None else f"{v:.4f}"

    print(f"\n{args.model}: {result['num_prompts']} prompts, {result['num_positions']} positions, "
          f"{result['max_new_tokens']} generated tokens each")
    print_summary(summary)
    print(f"\n{'metric':<22}{'teacher':>10}{'student':>10}   95% CI over prompts")
    print(f"{'perplexity':<22}{num(m['ppl_teacher']):>10}{num(m['ppl_student']):>10}")
    for key in ("token_agreement", "last_token_agreement", "top5_overlap", "kl_mean", "kl_max", "logit_l2_mean",
                "logit_cosine_mean", "generation_agreement"):
        interval = f"   [{ci[key][0]:.4f}, {ci[key][1]:.4f}]" if key in ci else ""
        print(f"{key:<22}{'':>10}{num(m[key]):>10}{interval}")
    if "floor_kl_mean" in m:
        print(f"\nfloor: the same {summary['num_modules']} modules removed (output zero): token_agreement "
              f"{num(m['floor_token_agreement'])}, kl_mean {num(m['floor_kl_mean'])}; kl_recovered "
              f"{num(m['kl_recovered'])} (1 - student KL / floor KL)")
    if timing.get("stream"):
        print_stream(summary["stream"])
        print(f"\ntime: student {timing['student_s']:.1f} s (streamed), teacher, student and floor side by side "
              f"{timing['evaluate_s']:.1f} s, total {timing['total_s']:.1f} s")
        return
    print(f"\ntime: load {timing['load_s']:.1f} s, student {timing['student_s']:.1f} s, teacher "
          f"{timing['teacher_s']:.1f} s{' (cached)' if timing['teacher_cached'] else ''}, floor "
          f"{timing['floor_s']:.1f} s, evaluate {timing['evaluate_s']:.1f} s, total {timing['total_s']:.1f} s")


def cmd_generate(args) -> None:
    import shutil
    import textwrap
    from itertools import zip_longest

    from ..eval.student import generate_side_by_side

    plain_warnings()
    check_max_new_tokens(args.max_new_tokens)
    check_device(args.device)
    spec, io = spec_from_args(args)
    out = generate_side_by_side(args.model, args.prompt, spec, io, max_new_tokens=args.max_new_tokens, chat=args.chat,
                                seed=args.seed, dtype=args.dtype, device=args.device)
    print_summary(out["compression"])
    width = max(20, (shutil.get_terminal_size().columns - 3) // 2)

    def lines(s):
        return [piece for line in s.splitlines() or [""] for piece in textwrap.wrap(line, width) or [""]]

    print(f"\nprompt: {args.prompt}\n")
    rows = [("teacher", "student"), ("-" * width, "-" * width)]
    for left, right in rows + list(zip_longest(lines(out["teacher"]), lines(out["student"]), fillvalue="")):
        print(f"{left:<{width}} | {right}")
    print(f"\nthe continuations agree on the first {out['agree_tokens']} of {args.max_new_tokens} tokens")


def cmd_lm_eval(args) -> None:
    import torch

    from ..eval.lmeval import parse_tasks
    from ..eval.student import lm_eval_student
    from ..io.results import check_writable, command_line, versions, write_json

    json_path = check_writable(args.json) if args.json else None  # fail before the long work
    check_device(args.device)
    tasks = parse_tasks(args.tasks)
    torch.manual_seed(args.seed)
    spec, io = spec_from_args(args)
    result, summary, timing = lm_eval_student(args.model, spec, io, tasks, limit=args.limit, batch_size=args.batch_size,
                                              include_path=args.include_path, dtype=args.dtype, device=args.device)
    print_lm_eval(args, result, summary, timing)
    if json_path:
        write_json(json_path, {"model": args.model, "config": args_config(args), "lm_eval": result,
                               "compression": summary, "timing": timing,
                               "versions": {**versions(), "lm_eval": result["lm_eval_version"]}, "command": command_line()})
        print(f"wrote {json_path}")


def print_lm_eval(args, result: dict, summary: dict, timing: dict) -> None:
    from ..eval.lmeval import format_table, header_line

    print(f"\n{args.model}: {header_line(result)}")
    print_summary(summary)
    print("\n" + format_table(result))
    print(f"\ntime: load {timing['load_s']:.1f} s, student {timing['student_s']:.1f} s, lm-eval (teacher and "
          f"student) {timing['lm_eval_s']:.1f} s, total {timing['total_s']:.1f} s")


def add_experiment_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_compress_args(p)
    p.add_argument("--out", required=True, help="results directory: created on first use; a rerun skips "
                   "the points already measured there; refused when it holds results for another model")
    add_eval_args(p)
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="evaluation prompts, one a line (default: the bundled 100 prompts)")


def settings_from_args(args):
    from ..experiments.runs import EvalSettings

    return EvalSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EvalSettings)})


def cmd_sweep(args) -> None:
    from ..experiments.runs import grid_axes, sweep

    axes = grid_axes(args.grid_file, args.grid)  # fail before loading the model
    spec, io = spec_from_args(args)
    sweep(settings_from_args(args), args.out, spec, axes, io)


def cmd_scan(args) -> None:
    from ..experiments.runs import parse_budget, scan

    budgets = [parse_budget(b) for b in args.budget or []]  # fail before loading the model
    spec, io = spec_from_args(args)
    scan(settings_from_args(args), args.out, spec, args.per, budgets, io)


def cmd_frontier(args) -> None:
    from ..bench.measure import parse_ints
    from ..experiments.runs import frontier
    from ..experiments.report import frontier_section
    from ..io.results import write_json

    sizes = sorted(set(parse_ints(args.sizes, "--sizes")))
    if args.time_budget is not None and args.time_budget <= 0:
        raise InputError(f"--time-budget must be > 0 minutes, got {args.time_budget}")
    spec, io = spec_from_args(args)
    result = frontier(settings_from_args(args), args.out, spec, sorted(args.min_agreement), sizes,
                      None if args.compare == "none" else args.compare,
                      float("inf") if args.time_budget is None else 60 * args.time_budget, io, args.scan_fit,
                      args.decode_bench)
    for path in frontier_section(result, args.out):
        print(f"wrote {path}")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")


def cmd_compare(args) -> None:
    from ..experiments.compare import compare, markdown, parse_methods
    from ..fit.student import StudentSpec
    from ..io.results import write_json

    methods = parse_methods(args.methods)  # fail before loading the model
    given = [f"--{k.replace('_', '-')}" for k in ("structure", "block_size", "rank", "param_budget", "block_sizes",
                                                   "spectra_bits") if getattr(args, k) != getattr(StudentSpec, k)]
    if given:
        raise InputError(f"compare sets the structure and size of each method (--methods); drop {', '.join(given)}",
                         "methods")
    if args.recipe and args.fit == "sequential":  # compare's default fit gives way to the recipe's
        args.fit = StudentSpec.fit
    # the quantization options are the quant methods' own (a circulant base spec refuses them)
    quant = {"quant_grid": args.quant_grid, "quant_damp": args.quant_damp}
    args.quant_grid, args.quant_damp = StudentSpec.quant_grid, StudentSpec.quant_damp
    methods = [(n, {**m, **quant} if m["structure"] == "quant" else m) for n, m in methods]
    spec, io = spec_from_args(args)
    result = compare(settings_from_args(args), args.out, spec, methods, args.decode_bench, io)
    print("\n" + markdown(result))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")


def cmd_report(args) -> None:
    from ..experiments.report import render

    for path in render(args.run_dir, args.out, args.bench, args.frontier):
        print(f"wrote {path}")


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); recorded in the result")
    p.add_argument("--repeats", type=int, default=30, help="timed repeats per figure, medians taken (layer: 30, cut to ~3 s per figure; model: 3)")
    p.add_argument("--json", metavar="PATH", help="write results and provenance here (markdown table beside it, .md)")


def write_bench(args, results: dict, table: str) -> None:
    from ..bench.measure import header_lines
    from ..io.results import atomic_write, command_line, write_json

    text = header_lines(results["versions"]) + table
    print(text, end="")
    if args.json:
        write_json(args.json, results)
        atomic_write(Path(args.json).with_suffix(".md"), f"`{command_line()}`\n\n" + text)
        print(f"wrote {args.json} and {Path(args.json).with_suffix('.md')}")


def start_bench(args) -> dict:
    """Checks and settings shared by both benches; returns the provenance part of the result."""
    import torch

    from ..io.results import check_writable, command_line, versions

    if args.json:
        check_writable(args.json)  # fail before the long work
    check_device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            raise InputError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.repeats < 1:
        raise InputError(f"--repeats must be >= 1, got {args.repeats}")
    torch.manual_seed(args.seed)
    return {"versions": versions(), "command": command_line(),
            "config": args_config(args, drop=("bench_command",))}


def cmd_bench_layer(args) -> None:
    from ..bench.layer import bench_layers
    from ..bench.measure import layer_table, parse_ints, parse_shape

    results = start_bench(args)
    rows = bench_layers([parse_shape(s) for s in args.shape.split(",")] if args.shape else None,
                        parse_ints(args.block_size, "--block-size"),
                        parse_ints(args.tokens, "--tokens") if args.tokens else None, model_id=args.model,
                        dtype=args.dtype, device=args.device, repeats=args.repeats, seed=args.seed,
                        spectra_bits=args.spectra_bits)
    results["results"] = rows
    if len(rows) == 1:
        results.update(rows[0])  # a single point: its figures at the top level (`speedup` = cold)
    write_bench(args, results, layer_table(rows))


def cmd_bench_model(args) -> None:
    from tqdm import tqdm

    from ..bench.measure import bench_model, check_cuda_graphs, model_table
    from ..structures.circulant import fuse_circulant_mlp_
    from ..io.models import load_model
    from ..io.prompts import load_prompts, tokenize_prompts

    results = start_bench(args)
    if args.num_prompts < 1 or args.new_tokens < 1:
        raise InputError(f"--num-prompts and --new-tokens must be >= 1, got {args.num_prompts} and {args.new_tokens}")
    check_cuda_graphs(args.cuda_graphs, args.device, not args.no_compile)
    prompts = load_prompts(args.prompts)[:args.num_prompts]
    spec_io = spec_from_args(args)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    student, summary = student_from_args(args, spec_io, model, tokenizer)
    summary["fused_mlps"] = 0 if args.no_fuse else len(fuse_circulant_mlp_(student))
    ids = tokenize_prompts(tokenizer, prompts)
    with tqdm(desc="bench model", unit="pass") as bar:  # (bench_model sets the total: repeats x kinds)
        results.update(bench_model(model, student, ids, new_tokens=args.new_tokens, repeats=args.repeats,
                                   compile=not args.no_compile, progress=bar, cuda_graphs=args.cuda_graphs))
    results["compression"] = summary
    write_bench(args, results, model_table(results))


def cmd_kernel(args) -> None:
    from ..ops.kernel import main as kernel_main

    kernel_main()


def add_student_commands(sub) -> None:
    p = sub.add_parser("compress", help="compress a model and print what was replaced")
    add_model_args(p)
    add_compress_args(p)
    add_stream_arg(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("eval", help="compress a model and measure it against the original: logit distances, "
                       "KL, token and generation agreement, perplexity")
    add_model_args(p)
    add_compress_args(p)
    add_eval_args(p)
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="evaluation prompts, one a line (default: the bundled 100 prompts)")
    p.add_argument("--json", metavar="PATH", help="write metrics, per-prompt values and provenance here")
    add_stream_arg(p)
    p.set_defaults(func=cmd_eval, layers=EVAL_DEFAULT_LAYERS)

    p = sub.add_parser("generate", help="teacher and student greedy completions of a prompt, side by side")
    p.add_argument("prompt", nargs="?", default="Explain why FFT can speed up matrix-vector products.")
    add_model_args(p)
    add_compress_args(p)
    add_eval_args(p)
    p.set_defaults(func=cmd_generate, layers=EVAL_DEFAULT_LAYERS)

    p = sub.add_parser("lm-eval", help="lm-evaluation-harness tasks on the original and the compressed model, side "
                       "by side (offline with the bundled tasks bcllm_ppl and bcllm_mc; needs bcllm[lmeval])")
    add_model_args(p)
    add_compress_args(p)
    p.add_argument("--tasks", default="bcllm_ppl,bcllm_mc",
                   help="comma-separated lm-eval tasks: the bundled bcllm_ppl (perplexity over 30 paragraphs) and "
                        "bcllm_mc (48 four-way questions), any lm-eval task or group (its dataset must be available), "
                        "a task YAML file, or tasks defined under --include-path")
    p.add_argument("--include-path", action="append", metavar="DIR", help="a folder of lm-eval task YAML files; repeatable")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N documents of each task")
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size")
    p.add_argument("--json", metavar="PATH", help="write both models' metrics, per-document scores and provenance here")
    p.set_defaults(func=cmd_lm_eval, layers=EVAL_DEFAULT_LAYERS)

    p = sub.add_parser("export", help="write a student saved with --save as a self-contained Hugging Face folder "
                       "(weights, config, tokenizer, modeling code) that loads without bcllm")
    p.add_argument("student_dir", help="folder written by --save")
    p.add_argument("out_dir", help="new or empty folder for the Hugging Face model")
    p.add_argument("--model", default=None, help="the base model, for folders saved before bcllm recorded it")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> None:
    from ..io.artifact import export_student

    out = export_student(args.student_dir, args.out_dir, model=args.model)
    print(f"wrote {out}: load it with AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")


def add_experiment_commands(sub) -> None:
    p = sub.add_parser("scan", help="per-layer sensitivity: patch one layer (or module) at a time, each of "
                       "--layers; --budget then picks layers for a parameter or fidelity budget")
    add_experiment_args(p)
    p.add_argument("--per", choices=["layer", "module"], default="layer",
                   help="patch one decoder layer at a time, or one module (e.g. gate_proj of one layer)")
    p.add_argument("--budget", action="append", metavar="KIND=VALUE",
                   help="choose layers greedily from the scan and measure the choice: params=0.3 (parameter "
                        "reduction to reach), agreement=0.9 (token agreement floor), kl=0.5 (KL ceiling); repeatable")
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("sweep", help="measure a grid of configurations; resumable, one JSONL record per point")
    add_experiment_args(p)
    p.add_argument("--grid", nargs="+", action="append", metavar=("KEY", "VALUE"),
                   help="an axis of the grid: a student setting and its values, e.g. --grid block_size 4 8 16 "
                        "--grid layers 12 10-19 all; repeatable; replaces the same axis of --grid-file")
    p.add_argument("--grid-file", help="TOML file: `key = [v1, v2]` is an axis, `key = v` a fixed setting")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("frontier", help="the largest parameter reduction that keeps token agreement >= a floor: "
                       "per-layer scan at several block sizes, greedy mixed sizes, bisection by measurement, "
                       "low-rank at the same budgets beside it")
    add_experiment_args(p)
    p.add_argument("--min-agreement", type=float, nargs="+", required=True, metavar="A",
                   help="token agreement floor(s) on --prompts, e.g. 0.8 0.9")
    p.add_argument("--sizes", default="4,16", help="block sizes each layer may take (comma-separated)")
    p.add_argument("--compare", default="lowrank", help="a budgeted structure measured at the same per-module "
                   "budgets (lowrank, blockdiag), or none")
    p.add_argument("--time-budget", type=float, default=None, metavar="MIN",
                   help="stop searching after this many minutes and report the best found (the scan always finishes)")
    from ..fit.student import FITS

    p.add_argument("--scan-fit", default="aware", choices=FITS,
                   help="fit of the single-layer scan that orders the search (aware: one calibration pass for "
                        "all layers); the measured configurations use --fit")
    from ..experiments.runs import DECODE_BENCH

    p.add_argument("--decode-bench", default="compiled", choices=DECODE_BENCH,
                   help="time each chosen student's greedy decode against dense with bench model's lean loop "
                        "(compiled: through torch.compile, as bench model; eager; none)")
    p.add_argument("--json", metavar="PATH", help="also write the result (chosen configurations, curve) here")
    p.set_defaults(func=cmd_frontier, max_new_tokens=0)

    p = sub.add_parser("report", help="markdown report with PNG plots from a scan/sweep results directory")
    p.add_argument("run_dir", nargs="+", help="results directories written by bcllm scan / sweep (same model)")
    p.add_argument("--out", default="report.md", help="markdown file; plots go to a folder of the same name")
    p.add_argument("--bench", nargs="*", default=[], help="bcllm bench JSON files for the speed section")
    p.add_argument("--frontier", nargs="*", default=[], help="bcllm frontier --json files, a section each")
    p.set_defaults(func=cmd_report)


def add_compare_command(sub) -> None:
    from ..experiments.runs import DECODE_BENCH

    p = sub.add_parser("compare", help="the methods a user might pick instead, on the same modules: int8..int2 "
                       "quantization, pruning, low-rank and circulant at several sizes; fidelity against bits per "
                       "weight (table and plot), each student's decode timed against dense")
    add_experiment_args(p)
    from ..experiments.compare import METHODS

    p.add_argument("--methods", default="all", help=f"comma-separated, each NAME or NAME@FIT (its own fit; the others "
                   f"take --fit): {', '.join(METHODS)}; or all (default)")
    p.add_argument("--decode-bench", default="compiled", choices=DECODE_BENCH,
                   help="time each student's greedy decode against dense with bench model's lean loop (compiled, "
                        "eager, none)")
    p.add_argument("--json", metavar="PATH", help="also write the result (rows, command, versions) here")
    # sequential: GPTQ, Wanda and the sequential closed form, the same effort for every family
    p.set_defaults(func=cmd_compare, max_new_tokens=0, fit="sequential")


def add_bench_commands(sub) -> None:
    from ..bench.measure import BENCH_PROMPTS

    bench = sub.add_parser("bench", help="speed against dense, measured in the same run: per layer or whole model")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    p = bench_sub.add_parser("layer", help="dense nn.Linear vs BlockCirculantLinear, hot and cold cache")
    add_model_args(p)
    p.add_argument("--shape", help="OUTxIN[,OUTxIN...] (default: the model's projection shapes, 4096x4096, 11008x4096)")
    p.add_argument("--block-size", default="16", help="one or more block sizes, comma-separated")
    p.add_argument("--tokens", help="rows per call, comma-separated (default: 1,16,128,512)")
    p.add_argument("--spectra-bits", type=int, default=32, choices=[32, 8],
                   help="the circulant layer's spectra in float32 or int8 (codes and a scale per output block)")
    add_bench_args(p)
    p.set_defaults(func=cmd_bench_layer, repeats=30)
    p = bench_sub.add_parser("model", help="prefill and greedy-decode tokens/s of dense and compressed model")
    add_model_args(p)
    add_compress_args(p)
    p.add_argument("--prompts", default=None, metavar="FILE", help="prompts, one a line (default: the bundled set)")
    p.add_argument("--num-prompts", type=int, default=BENCH_PROMPTS, help="first N prompts of the file")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy decode steps per prompt")
    p.add_argument("--no-fuse", action="store_true", help="keep gate_proj and up_proj as separate products")
    p.add_argument("--no-compile", action="store_true",
                   help="run the lean decode loop eager only (default: also through torch.compile, about a "
                        "minute per model on 2 cores)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="on a GPU: replay each compiled decode step as one CUDA graph (torch.compile "
                        "mode reduce-overhead), which removes the per-kernel launch cost")
    add_bench_args(p)
    p.set_defaults(func=cmd_bench_model, repeats=3)
    p = sub.add_parser("kernel", help="build the fused CPU decode kernel now (make setup does, else the first decode "
                       "product) and say whether decode products use it")
    p.set_defaults(func=cmd_kernel)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bcllm", description="Block-circulant (FFT) compression of causal "
                                     "LMs, measured against the original: fidelity and speed.")
    parser.add_argument("--version", action="version", version=f"bcllm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_student_commands(sub)
    add_experiment_commands(sub)
    add_compare_command(sub)
    add_bench_commands(sub)
    return parser


def silence_progress_bars() -> None:
    """Every tqdm bar of this process is created disabled (ranks other than 0 under torchrun: their
    bars would interleave with rank 0's). tqdm has no switch that a call's own `disable=` does not
    override, so its constructor is wrapped; errors and warnings still reach stderr."""
    import tqdm.std

    init = tqdm.std.tqdm.__init__
    if getattr(init, "bcllm_silenced", False):
        return

    @functools.wraps(init)
    def disabled(self, *args, **kwargs):
        kwargs["disable"] = True
        init(self, *args, **kwargs)

    disabled.bcllm_silenced = True
    tqdm.std.tqdm.__init__ = disabled


def one_voice(args) -> None:
    """Under torchrun (bcllm.dist): `--device cuda` is each rank's own GPU, and only rank 0 prints
    results and progress bars (every rank computes them; errors still go to each rank's stderr)."""
    if dist.world() > 1:
        if getattr(args, "device", None):
            args.device = dist.device_for(args.device)
            import torch

            if args.device.startswith("cuda") and torch.cuda.is_available():  # the current device too: this rank's GPU
                torch.cuda.set_device(torch.device(args.device))  # (device_for: LOCAL_RANK % the GPUs)
        if not dist.is_main():
            sys.stdout = open(os.devnull, "w")
            silence_progress_bars()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    one_voice(args)
    try:
        args.func(args)
    except InputError as e:
        # Bad input, said in the library's words with the flag named; BCLLM_DEBUG=1 shows the traceback.
        # Any other exception is a bug and keeps its traceback.
        if os.environ.get("BCLLM_DEBUG"):
            raise
        print(f"bcllm {args.command}: error: {usage_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished results are on disk", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
