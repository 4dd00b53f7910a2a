"""The student pipeline: load → compress → fit → distil → save, from one frozen spec.

`StudentSpec` says what the student is (structure, sizes, targets, layers, fit, calibration,
distillation); `StudentIO` says where things go (save, load, checkpoints, resume, overlap
override) and never changes what is measured. `build_student(model, tokenizer, spec, io)` is
the one place a student is built; the CLI, the experiments, scripts and tests all call it.

    spec = StudentSpec(layers="10-19", fit="sequential")
    student, summary = build_student(model, tokenizer, spec)

Field names and defaults are those of the command-line options (`--block-size` is
`block_size`), so results directories written before this module existed still resume.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import typing

import torch
from dataclasses import dataclass, field

from torch import nn

from ..io.artifact import base_record
from .calib_text import check_overlap, load_calibration, make_batches, overlapping
from .teacher_text import TURN, load_seeds, student_continuations
from .closed_form import fit_aware_, fit_sequential_, fitted_modules
from ..io.checkpoint import load_fitted, save_fitted
from .distill import DistillConfig, distill_, trainable_parameters
from ..errors import InputError
from ..io.models import model_fingerprint
from ..io.prompts import load_prompts
from .reconstruct import TARGETS, BlockConfig, reconstruct_
from ..structures.base import STRUCTURES, structure_config
from ..structures.circulant import check_spectra_bits, set_spectra_bits_
from .transforms import KINDS, Transform, apply_transform_, find_transform
from ..surgery import compress_, decoder_layers, layer_index, select_modules

FITS = ("frobenius", "aware", "sequential", "block")
# fit="block" runs the whole recovery recipe: sequential closed form, block reconstruction, then
# this many distillation steps unless distill_steps says otherwise.
BLOCK_DISTILL_STEPS = 100
# --recipe long: the recipe for users with more time (about an hour on 2 cores for ten MLPs).
RECIPES = {"block": BLOCK_DISTILL_STEPS, "long": 400}
HELD_OUT_MAX = 64  # distillation's held-out calibration samples, at most


@dataclass(frozen=True)
class StudentSpec:
    """What the student is. Every field is a plain value (JSON-serialisable)."""

    structure: str = "circulant"        # a registered structure (structures.STRUCTURES)
    block_size: int = 16                # circulant block size; the others' budget unless rank is given
    rank: int | None = None             # lowrank: the rank; hybrid: plus a circulant of block_size
    param_budget: int | None = None     # every structure gets the parameters of a circulant of this block size
    layers: str = "all"                 # decoder layers: all, 10-19, 0,3,5
    targets: str = "mlp"                # module suffixes, globs, or mlp / attn
    fit: str = "frobenius"              # frobenius | aware | sequential | block (the recovery recipe)
    calib: str = "teacher"              # calibration source (calib_text.SOURCES) or a file
    calib_samples: int | None = None    # None: the source's own (teacher: all, about 2,200; the others: 500)
    calib_tokens: int = 48              # new tokens per self-generated sample; samples cut to this + 64
    ridge: float = 1e-4                 # least-squares ridge, relative to the Gram diagonal
    distill_steps: int | None = None    # None: BLOCK_DISTILL_STEPS with fit="block", else 0
    distill_lr: float = 1e-3
    distill_batch: int = 8              # samples per calibration batch (fit and distillation)
    hidden_mse: float = 0.0
    train_norms: bool = False
    distill_bf16: bool = False          # student forward under bfloat16 autocast while distilling
    distill_vocab: str = "auto"         # full | teacher: the loss over the tokens in the teacher's top-k anywhere in
                                        # the batch | auto: teacher with forward KL and no on-policy steps, else full
    distill_divergence: str = "forward" # forward | reverse | jsd | skew (distill.DIVERGENCES)
    distill_onpolicy: float = 0.0       # share of distillation steps on the student's own continuations
    adapter_rank: int = 0               # distillation also trains a rank-r correction of every dense linear from
                                        # the first compressed layer on, merged into it (no parameters added)
    block_epochs: int = 4               # block reconstruction (fit="block"): epochs over the cached activations
    block_lr: float = 1e-3
    block_target: str = "mlp"           # mlp: the dense MLP on the student's inputs; layer: the teacher's layer output
    block_batch_tokens: int = 1024
    fit_samples: int | None = 320       # the fit (closed forms, block reconstruction) on the first this many
                                        # training samples (None: all); distillation uses them all
    block_sizes: str = ""               # per-module block sizes (circulant) or budgets (lowrank): "GLOB=B,..."
    transform: str = "none"             # circulant: none | hidden | residual | both (transforms.py), found first
    quant_grid: str = "float"           # quant: float (min..max, Q4_1's) | int (GPTQ's, zero exactly on the grid)
    quant_damp: float = 0.0             # quant with fit sequential (GPTQ): damping, the larger of it and ridge
    spectra_bits: int = 32              # circulant: 32 (float32 spectra) | 8 (int8 codes, a scale per frequency
                                        # and output block; the fits and distillation see the rounded spectra)
    seed: int = field(default=0, metadata={"point": False})  # the run's seed: not a sweep setting

    def __post_init__(self):
        structure_config(self.structure)
        if self.fit not in FITS:
            raise InputError(f"unknown fit {self.fit!r}; allowed: {', '.join(FITS)}", "fit")
        for name, low in (("block_size", 1), ("calib_samples", 1), ("calib_tokens", 2), ("distill_steps", 0),
                          ("distill_batch", 1), ("block_epochs", 0), ("block_batch_tokens", 1),
                          ("fit_samples", 1), ("adapter_rank", 0)):
            if getattr(self, name) is not None and getattr(self, name) < low:
                raise InputError(f"{name} must be >= {low}, got {getattr(self, name)}", name)
        check_spectra_bits(self.spectra_bits)
        if self.distill_vocab not in ("auto", "full", "teacher"):
            raise InputError(f"unknown distill_vocab {self.distill_vocab!r}; allowed: auto, full, teacher",
                             "distill_vocab")
        if self.transform not in KINDS:
            raise InputError(f"unknown transform {self.transform!r}; allowed: {', '.join(KINDS)}", "transform")
        if self.transform != "none" and (self.structure != "circulant" or self.targets != "mlp"):
            raise InputError("transform applies to block-circulant MLPs (structure circulant, targets mlp); "
                             "low-rank fits are invariant to it", "transform")
        if self.block_sizes and self.structure not in ("circulant", "lowrank"):
            raise InputError("block_sizes applies to circulant (block sizes) and lowrank (budgets)", "block_sizes")
        parse_block_sizes(self.block_sizes)
        if (self.quant_grid, self.quant_damp) != ("float", 0.0) and self.structure != "quant":
            raise InputError(f"quant_grid applies to structure quant (with quant_damp), not {self.structure}",
                             "quant_grid")
        if self.quant_grid not in ("float", "int") or not 0 <= self.quant_damp < 1:
            raise InputError(f"quant_grid must be float or int and quant_damp in [0, 1); got {self.quant_grid!r}, "
                             f"{self.quant_damp}", "quant_grid")
        if self.block_target not in TARGETS:
            raise InputError(f"unknown block_target {self.block_target!r}; allowed: {', '.join(TARGETS)}",
                             "block_target")

    @property
    def vocab(self) -> str:
        """The distillation vocabulary distill_vocab resolves to: auto is the teacher's (per batch: the
        same held-out fidelity as the full vocabulary, docs/results.md, at 1.6x the steps' speed) where
        it applies, forward KL on cached targets without on-policy steps, else the full vocabulary."""
        if self.distill_vocab != "auto":
            return self.distill_vocab
        return "teacher" if self.distill_divergence == "forward" and not self.distill_onpolicy else "full"

    @property
    def steps(self) -> int:
        """The distillation steps this spec runs (distill_steps, or the recipe's default)."""
        if self.distill_steps is not None:
            return self.distill_steps
        return BLOCK_DISTILL_STEPS if self.fit == "block" else 0

    def point(self) -> dict:
        """The settings that identify this student in a results directory: the point fields, with
        those that cannot matter reset to KEY_DEFAULTS (calibration when nothing is calibrated,
        distillation settings without distillation, block settings without fit="block"), and
        distill_steps resolved."""
        point = {k: getattr(self, k) for k in POINT_FIELDS}
        point["distill_steps"] = self.steps
        point["distill_vocab"] = self.vocab
        if self.calib_samples is None and self.calib != "teacher":  # the count calibration_text uses
            point["calib_samples"] = 500
        if point["fit_samples"] is not None and point["calib_samples"] is not None and \
                point["fit_samples"] >= point["calib_samples"]:  # the fit sees every sample either way
            point["fit_samples"] = None
        unused = []
        if self.fit == "frobenius" and not self.steps and self.transform == "none":
            unused += ["calib", "calib_samples", "calib_tokens", "ridge", "distill_batch", "quant_damp"]
        if not self.steps:
            unused += ["distill_lr", "hidden_mse", "train_norms", "distill_bf16", "distill_vocab", "distill_divergence",
                       "distill_onpolicy", "adapter_rank"]
        if self.fit != "block":
            unused += ["block_epochs", "block_lr", "block_target", "block_batch_tokens"]
        if self.fit == "frobenius" and self.transform == "none":
            unused += ["fit_samples"]
        return {k: KEY_DEFAULTS[k] if k in unused else v for k, v in point.items()}


@dataclass(frozen=True)
class StudentIO:
    """Where a student's files go; none of it changes the student that is measured."""

    save: str | None = None             # write the fitted modules here (checkpoint.save_fitted)
    load: str | None = None             # load a saved student instead of building one
    distill_dir: str | None = None      # distillation checkpoints
    resume: bool = False                # continue an interrupted distillation from distill_dir
    force_overlap: bool = False         # calibrate even on text that overlaps the evaluation prompts
    curve: bool = False                 # record agreement and KL on the evaluation prompts at every held-out
                                        # evaluation of distillation (monitoring only: nothing is chosen by it)


IO_FIELDS = tuple(f.name for f in dataclasses.fields(StudentIO))
POINT_FIELDS = tuple(f.name for f in dataclasses.fields(StudentSpec) if f.metadata.get("point", True))
# Point keys name the settings that differ from these values: the defaults when results were
# first written. Never edit an entry; when a default changes, the old value stays here, so results
# on disk keep their meaning. A new field gets its default at the time it is added.
KEY_DEFAULTS = {"structure": "circulant", "block_size": 16, "rank": None, "param_budget": None, "layers": "all",
                "targets": "mlp", "fit": "frobenius", "calib": "self-chat", "calib_samples": 96, "calib_tokens": 48,
                "ridge": 1e-4, "distill_steps": 0, "distill_lr": 1e-3, "distill_batch": 8, "hidden_mse": 0.0,
                "train_norms": False, "distill_bf16": False, "distill_vocab": "full", "block_epochs": 4, "block_lr": 1e-3,
                "block_target": "mlp", "block_batch_tokens": 1024, "block_sizes": "", "transform": "none",
                "distill_divergence": "forward", "distill_onpolicy": 0.0, "fit_samples": None, "quant_grid": "float",
                "quant_damp": 0.0, "adapter_rank": 0, "spectra_bits": 32}


def parse_block_sizes(text: str) -> dict[str, int]:
    """"*.layers.3.mlp.*=4,down_proj=32" -> {pattern: size}; patterns as targets (suffixes or globs)."""
    sizes = {}
    for item in filter(None, text.replace(" ", "").split(",")):
        pattern, sep, value = item.rpartition("=")
        if not sep or not pattern or not value.isdigit() or int(value) < 1:
            raise InputError(f"block_sizes item {item!r}: write PATTERN=SIZE with a module suffix or glob and a "
                             f"size >= 1, e.g. '*.layers.3.mlp.*=4,down_proj=32'", "block_sizes")
        sizes[pattern] = int(value)
    return sizes


def spec_value(name: str, value):
    """A setting given as text or TOML (a grid value) converted to the spec field's type."""
    if name in IO_FIELDS:
        raise InputError(f"{name!r} is an output option (where files go), not a setting of the student; "
                         f"give it once for the whole run, not per point", "grid")
    if name not in POINT_FIELDS:
        raise InputError(f"unknown setting {name!r}; allowed: {', '.join(sorted(POINT_FIELDS))}", "grid")
    if isinstance(value, (list, dict)):
        raise InputError(f"setting {name!r}: each value must be a number or a string, got {value!r}", "grid")
    kinds = [k for k in typing.get_args(typing.get_type_hints(StudentSpec)[name]) or
             [typing.get_type_hints(StudentSpec)[name]] if k is not type(None)]
    kind = kinds[0]
    if kind is bool:
        if isinstance(value, bool) or str(value).lower() in ("true", "false"):
            return value if isinstance(value, bool) else str(value).lower() == "true"
        raise InputError(f"setting {name!r} is a flag: values must be true or false, got {value!r}", "grid")
    if isinstance(value, bool) or (value is None and len(kinds) == 1):
        raise InputError(f"setting {name!r}: got {value!r}, expected a value like "
                         f"{getattr(StudentSpec(), name)!r}", "grid")
    try:
        return None if value is None else kind(str(value))
    except ValueError:
        raise InputError(f"setting {name!r}: cannot read {value!r} as {kind.__name__}", "grid") from None


def config_for(spec: StudentSpec):
    """The structure config the spec's size options describe (registry: structures.STRUCTURES).

    param_budget B gives every structure the parameter count of a block-circulant of block size
    B (for circulant: block size B). Without it, block_size is the circulant block size and the
    budget of the other structures, unless rank sets the rank (lowrank: the rank; hybrid: a
    circulant part of block_size plus that rank)."""
    cls = structure_config(spec.structure)
    if spec.rank is not None and not cls.takes_rank:
        ranked = [n for n, c in STRUCTURES.items() if c.takes_rank]
        raise InputError(f"rank applies to {' and '.join(ranked)}, not {spec.structure}", "rank")
    if spec.rank is not None and spec.param_budget is not None:
        raise InputError("give rank or param_budget, not both (the budget sets the rank)", "rank")
    size = spec.param_budget if spec.param_budget is not None else spec.block_size
    config = cls.from_options(size, spec.rank, targets=spec.targets, layers=spec.layers)
    if spec.structure == "quant":
        config = dataclasses.replace(config, zero_point=spec.quant_grid, damp=spec.quant_damp)
    if spec.spectra_bits != 32:
        if spec.structure != "circulant":
            raise InputError(f"spectra_bits applies to structure circulant, not {spec.structure}", "spectra_bits")
        config = dataclasses.replace(config, spectra_bits=spec.spectra_bits)  # (checked by the spec)
    if spec.block_sizes:
        if spec.rank is not None:
            raise InputError("block_sizes sets per-module budgets; give it without rank", "block_sizes")
        config = dataclasses.replace(config, block_sizes=parse_block_sizes(spec.block_sizes))
    return config


def build_student(model: nn.Module, tokenizer, spec: StudentSpec, io: StudentIO = StudentIO(), *,
                  eval_prompts: list[str] | None = None, model_id: str = "", progress: bool = True):
    """(student, summary): the compressed copy of `model` that `spec` describes; `model` is left
    unchanged. eval_prompts: the prompts it will be measured on (calibration text overlapping them
    is refused; None: the bundled prompts); model_id: the model's spec (calibration cache key)."""
    student = copy.deepcopy(model)
    if io.load:  # a saved student: its own config, no fitting (spectra_bits 8: its spectra rounded now)
        summary = load_fitted(student, io.load)
        if spec.spectra_bits != 32:
            if summary["config"]["structure"] != "circulant":
                raise InputError(f"spectra_bits applies to circulant students; {io.load!r} is "
                                 f"{summary['config']['structure']}", "spectra_bits")
            set_spectra_bits_(student, spec.spectra_bits)
            summary["config"]["spectra_bits"] = spec.spectra_bits
            summary["structured_bytes"] = sum(m.costs()["bytes"] for m in fitted_modules(student).values())
        return student, summary
    config = config_for(spec)
    if io.resume and not io.distill_dir:
        raise InputError("resume needs distill_dir (where the interrupted run left its checkpoint)", "resume")
    calibrated = spec.fit != "frobenius" or spec.steps
    samples = None
    if calibrated or spec.transform != "none":  # read once, checked against the prompts before any use
        samples = calibration_text(model, tokenizer, spec, io, eval_prompts, model_id, progress)
    transform, teacher = Transform(), model
    if spec.transform != "none":  # the student and the teacher it is fitted to, both reordered (same function)
        transform, seconds = transform_for(model, tokenizer, spec, config, samples[:spec.fit_samples], progress)
        apply_transform_(student, transform)
        teacher = apply_transform_(copy.deepcopy(model), transform)
    summary = compress_(student, config)  # frobenius: compress_ projects each weight
    summary["fit"] = spec.fit
    if spec.transform != "none":
        summary["transform"] = {"kind": spec.transform, "search_s": seconds, "history": transform.history}
    if calibrated:
        summary["calibration"] = fit_and_distill_(student, teacher, tokenizer, spec, io, samples, progress,
                                                  eval_prompts)
    if io.save:
        save_fitted(student, io.save, config, model_fingerprint(model),
                    summary.get("calibration", {}).get("extra_params", []), info=summary,
                    base=base_record(model_id) if model_id else None, transform=transform)
    return student, summary


def calibration_text(model: nn.Module | None, tokenizer, spec: StudentSpec, io: StudentIO, eval_prompts,
                     model_id: str, progress: bool) -> list[str]:
    """The spec's calibration samples (self-written ones come from `model`, cached per model),
    refused when they overlap the evaluation prompts (None: the bundled prompts) unless io.force_overlap."""
    n = spec.calib_samples if spec.calib_samples is not None else None if spec.calib == "teacher" else 500
    samples = load_calibration(spec.calib, model, tokenizer, n, spec.calib_tokens, spec.seed,
                               model_id, progress=progress)
    prompts = eval_prompts if eval_prompts is not None else load_prompts()
    if spec.calib == "teacher" and not io.force_overlap:  # the model's own replies: drop the few that overlap
        bad = set(overlapping(samples, prompts))
        samples = [s for i, s in enumerate(samples) if i not in bad]
    check_overlap(samples, prompts, force=io.force_overlap)
    return samples


def transform_for(model: nn.Module, tokenizer, spec: StudentSpec, config, samples: list[str], progress: bool):
    """(transforms.Transform, seconds): the spec's transform searched on the calibration `samples` for
    the MLPs it compresses (each at its own block size)."""
    start = time.perf_counter()
    prefix, _ = decoder_layers(model)
    sizes = {}
    for name in select_modules(model, config.targets, config.layers):
        sizes.setdefault(layer_index(name, prefix), config.block_size_for(name))
    batches = make_batches(tokenizer, samples, spec.distill_batch, spec.calib_tokens + 64,
                           next(model.parameters()).device)
    transform = find_transform(model, batches, sizes, spec.transform, spec.ridge, progress=progress)
    seconds = time.perf_counter() - start
    if progress:
        steps = "; ".join(f"{k} {v[0]:.3f} -> {v[-1]:.3f}" for k, v in list(transform.history.items())[:4])
        print(f"stage transform {spec.transform}: {seconds:.0f} s; objective {steps}"
              f"{' ...' if len(transform.history) > 4 else ''}", flush=True)
    return transform, seconds


def block_config(spec: StudentSpec) -> BlockConfig:
    """The block reconstruction settings of a spec with fit="block" (checked by BlockConfig)."""
    return BlockConfig(epochs=spec.block_epochs, lr=spec.block_lr, batch_tokens=spec.block_batch_tokens,
                       target=spec.block_target, seed=spec.seed)


def fit_and_distill_(student, teacher, tokenizer, spec: StudentSpec, io: StudentIO, samples: list[str],
                     progress: bool, eval_prompts: list[str] | None = None) -> dict:
    """The fit and the distillation of `student` to `teacher` on the calibration `samples`
    (calibration_text)."""
    distill, on_policy, on_eval = None, None, None
    if spec.steps:
        distill = DistillConfig(steps=spec.steps, lr=spec.distill_lr, hidden_mse=spec.hidden_mse,
                                train_norms=spec.train_norms, seed=spec.seed, bf16=spec.distill_bf16,
                                vocab=spec.vocab, divergence=spec.distill_divergence,
                                onpolicy=spec.distill_onpolicy, eval_every=eval_cadence(spec.steps),
                                adapter_rank=spec.adapter_rank)
        if spec.distill_onpolicy:
            on_policy = student_continuations(student, tokenizer, [s.split(TURN)[0] for s in load_seeds()],
                                              spec.distill_batch, spec.calib_tokens + 64, seed=spec.seed)
        if io.curve:
            on_eval = prompt_curve(student, teacher, tokenizer, eval_prompts if eval_prompts is not None
                                   else load_prompts())
    block = block_config(spec) if spec.fit == "block" else None
    info = fit_student_(student, teacher, tokenizer, samples, spec.fit, spec.ridge, spec.calib_tokens + 64,
                        spec.distill_batch, distill, distill_dir=io.distill_dir, resume=io.resume, progress=progress,
                        block=block, fit_samples=spec.fit_samples, on_policy=on_policy, on_eval=on_eval)
    info["calib"] = spec.calib
    return info


def eval_cadence(steps: int) -> int:
    """Held-out evaluation every 10 steps, sparser on long runs (about 12 points a curve): each one
    costs about as much as a few steps."""
    return max(10, steps // 12 // 10 * 10)


def prompt_curve(student, teacher, tokenizer, prompts: list[str], batch_size: int = 16):
    """on_eval for distill_: token agreement and KL of the student on `prompts` (teacher-forced,
    every position, as `eval` measures them); the teacher's side computed once here."""
    device = next(student.parameters()).device
    batches = make_batches(tokenizer, prompts, batch_size, 512, device)
    with torch.no_grad():
        teacher_lp = [torch.log_softmax(teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                                        .logits[b["attention_mask"].bool()].float(), -1) for b in batches]

    @torch.no_grad()
    def measure(step: int) -> dict:
        agree = kl = count = 0
        for b, lp in zip(batches, teacher_lp):
            z = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            lq = torch.log_softmax(z[b["attention_mask"].bool()].float(), -1)
            agree += int((lq.argmax(-1) == lp.argmax(-1)).sum())
            kl += float((lp.exp() * (lp - lq)).sum())
            count += lp.shape[0]
        return {"token_agreement": agree / count, "kl_mean": kl / count}
    return measure


def fit_student_(student: nn.Module, teacher: nn.Module, tokenizer, samples: list[str], fit: str = "aware",
                 ridge: float = 1e-4, max_length: int = 128, batch_size: int = 8, distill=None,
                 held_out_fraction: float = 0.1, distill_dir=None, resume: bool = False,
                 progress: bool = True, block: BlockConfig | None = None, fit_samples: int | None = None,
                 on_policy=None, on_eval=None) -> dict:
    """Fit (fit: frobenius = keep the projection, aware, sequential) and then optionally distil
    (distill: a distill.DistillConfig) the structured modules of `student` on calibration text.
    Distillation holds out the last `held_out_fraction` of the samples for its held-out KL; the
    fit uses the first `fit_samples` training samples (None: all), distillation all of them."""
    if fit not in FITS:
        raise InputError(f"unknown fit {fit!r}; allowed: {', '.join(FITS)}", "fit")
    device = next(student.parameters()).device
    info = {"fit": fit, "samples": len(samples), "ridge": ridge, "max_length": max_length}
    # at most HELD_OUT_MAX samples: the held-out KL runs every 10 steps, and 10% of a large source is
    # thousands of tokens a time
    n_held = min(int(len(samples) * held_out_fraction), HELD_OUT_MAX) if distill is not None else 0
    train = make_batches(tokenizer, samples[:len(samples) - n_held], batch_size, max_length, device)
    info["tokens"] = int(sum(b["attention_mask"].sum() for b in train))
    fit_on = train if fit_samples is None or fit_samples >= len(samples) - n_held else \
        make_batches(tokenizer, samples[:fit_samples], batch_size, max_length, device)
    if fit != "frobenius":
        info["fit_tokens"] = int(sum(b["attention_mask"].sum() for b in fit_on))
    start = time.perf_counter()
    if fit == "aware":
        fit_aware_(student, teacher, fit_on, ridge, progress)
    elif fit == "sequential":
        fit_sequential_(student, teacher, fit_on, ridge, progress)
    elif fit == "block":
        info["block"] = reconstruct_(student, teacher, fit_on, block, ridge, progress,
                                     checkpoint_dir=distill_dir, resume=resume)
    info["fit_s"] = time.perf_counter() - start
    if progress:
        print(stage_line(info), flush=True)
    if distill is not None:
        held = make_batches(tokenizer, samples[len(samples) - n_held:], batch_size, max_length, device) if n_held else []
        start = time.perf_counter()
        result = distill_(student, teacher, train, held, distill, checkpoint_dir=distill_dir, resume=resume,
                          progress=progress, on_policy=on_policy, on_eval=on_eval)
        info["distill_s"] = time.perf_counter() - start
        info["distill"] = {k: v for k, v in result.items() if k not in ("loss", "trainable")}
        if progress:
            print(stage_line(info, distilled=True), flush=True)
        inside = tuple(f"{n}." for n in fitted_modules(student))
        info["extra_params"] = [n for n in trainable_parameters(student, distill.train_norms) if not n.startswith(inside)]
    return info


def stage_line(info: dict, distilled: bool = False) -> str:
    """One line for a finished stage: its time and held-out figures (block: the mean held-out
    block error per layer before and after; distillation: held-out KL at its start and end)."""
    if distilled:
        d, held = info["distill"], info["distill"]["held_out_kl"]
        kl = f"; held-out KL {held[0][1]:.3f} -> {held[-1][1]:.3f}" if held else ""
        return (f"stage distill: {d['steps']} steps in {info['distill_s']:.0f} s "
                f"({d['tokens_per_s']:.0f} tokens/s){kl}")
    line = f"stage fit {info['fit']}: {info['fit_s']:.0f} s on {info.get('fit_tokens', info['tokens']):,} calibration tokens"
    layers = info.get("block", {}).get("layers", [])
    if layers:
        before = sum(r["held_before"] for r in layers) / len(layers)
        after = sum(r["held_after"] for r in layers) / len(layers)
        over = f"mean of {len(layers)} layers" if len(layers) > 1 else f"layer {layers[0]['layer']}"
        line += f"; held-out block error ({over}) {before:.3f} -> {after:.3f}"
    return line
