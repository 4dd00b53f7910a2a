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
from dataclasses import dataclass, field

from torch import nn

from .artifact import base_record
from .calib_data import check_overlap, load_calibration, make_batches
from .calibrate import fit_aware_, fit_sequential_, fitted_modules
from .checkpoint import load_fitted, save_fitted
from .distill import DistillConfig, distill_, trainable_parameters
from .errors import InputError
from .models import model_fingerprint
from .prompts import load_prompts
from .structures import STRUCTURES, structure_config
from .surgery import compress_

FITS = ("frobenius", "aware", "sequential")


@dataclass(frozen=True)
class StudentSpec:
    """What the student is. Every field is a plain value (JSON-serialisable)."""

    structure: str = "circulant"        # a registered structure (structures.STRUCTURES)
    block_size: int = 16                # circulant block size; the others' budget unless rank is given
    rank: int | None = None             # lowrank: the rank; hybrid: plus a circulant of block_size
    param_budget: int | None = None     # every structure gets the parameters of a circulant of this block size
    layers: str = "all"                 # decoder layers: all, 10-19, 0,3,5
    targets: str = "mlp"                # module suffixes, globs, or mlp / attn
    fit: str = "frobenius"              # frobenius | aware | sequential
    calib: str = "self-chat"            # calibration source: self-chat, self-seed, pydoc, or a file
    calib_samples: int = 96
    calib_tokens: int = 48              # new tokens per self-generated sample; samples cut to this + 64
    ridge: float = 1e-4                 # least-squares ridge, relative to the Gram diagonal
    distill_steps: int = 0
    distill_lr: float = 1e-3
    distill_batch: int = 8              # samples per calibration batch (fit and distillation)
    hidden_mse: float = 0.0
    train_norms: bool = False
    seed: int = field(default=0, metadata={"point": False})  # the run's seed: not a sweep setting

    def __post_init__(self):
        structure_config(self.structure)
        if self.fit not in FITS:
            raise InputError(f"unknown fit {self.fit!r}; allowed: {', '.join(FITS)}", "fit")
        for name, low in (("block_size", 1), ("calib_samples", 1), ("calib_tokens", 2), ("distill_steps", 0),
                          ("distill_batch", 1)):
            if getattr(self, name) < low:
                raise InputError(f"{name} must be >= {low}, got {getattr(self, name)}", name)


@dataclass(frozen=True)
class StudentIO:
    """Where a student's files go; none of it changes the student that is measured."""

    save: str | None = None             # write the fitted modules here (checkpoint.save_fitted)
    load: str | None = None             # load a saved student instead of building one
    distill_dir: str | None = None      # distillation checkpoints
    resume: bool = False                # continue an interrupted distillation from distill_dir
    force_overlap: bool = False         # calibrate even on text that overlaps the evaluation prompts


IO_FIELDS = tuple(f.name for f in dataclasses.fields(StudentIO))
POINT_FIELDS = tuple(f.name for f in dataclasses.fields(StudentSpec) if f.metadata.get("point", True))
# Point keys name the settings that differ from these values: the defaults when results were
# first written. Never edit an entry; when a default changes, the old value stays here, so results
# on disk keep their meaning. A new field gets its default at the time it is added.
KEY_DEFAULTS = {"structure": "circulant", "block_size": 16, "rank": None, "param_budget": None, "layers": "all",
                "targets": "mlp", "fit": "frobenius", "calib": "self-chat", "calib_samples": 96, "calib_tokens": 48,
                "ridge": 1e-4, "distill_steps": 0, "distill_lr": 1e-3, "distill_batch": 8, "hidden_mse": 0.0,
                "train_norms": False}


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
    return cls.from_options(size, spec.rank, spec.param_budget is not None, targets=spec.targets,
                            layers=spec.layers)


def build_student(model: nn.Module, tokenizer, spec: StudentSpec, io: StudentIO = StudentIO(), *,
                  eval_prompts: list[str] | None = None, model_id: str = "", progress: bool = True):
    """(student, summary): the compressed copy of `model` that `spec` describes; `model` is left
    unchanged. eval_prompts: the prompts it will be measured on (calibration text overlapping them
    is refused; None: the bundled prompts); model_id: the model's spec (calibration cache key)."""
    student = copy.deepcopy(model)
    if io.load:  # a saved student: its own config, no fitting
        return student, load_fitted(student, io.load)
    config = config_for(spec)
    summary = compress_(student, config)  # frobenius: compress_ projects each weight
    summary["fit"] = spec.fit
    if spec.fit != "frobenius" or spec.distill_steps:
        summary["calibration"] = calibrate_(student, model, tokenizer, spec, io, eval_prompts, model_id, progress)
    if io.save:
        save_fitted(student, io.save, config, model_fingerprint(model),
                    summary.get("calibration", {}).get("extra_params", []), info=summary,
                    base=base_record(model_id) if model_id else None)
    return student, summary


def calibrate_(student, model, tokenizer, spec: StudentSpec, io: StudentIO, eval_prompts, model_id: str,
               progress: bool) -> dict:
    """Calibration text (checked against the evaluation prompts), then the fit and the distillation."""
    if io.resume and not io.distill_dir:
        raise InputError("resume needs distill_dir (where the interrupted run left its checkpoint)", "resume")
    samples = load_calibration(spec.calib, model, tokenizer, spec.calib_samples, spec.calib_tokens, spec.seed,
                               model_id, progress=progress)
    check_overlap(samples, eval_prompts if eval_prompts is not None else load_prompts(), force=io.force_overlap)
    distill = None
    if spec.distill_steps:
        distill = DistillConfig(steps=spec.distill_steps, lr=spec.distill_lr, hidden_mse=spec.hidden_mse,
                                train_norms=spec.train_norms, seed=spec.seed)
    info = fit_student_(student, model, tokenizer, samples, spec.fit, spec.ridge, spec.calib_tokens + 64,
                        spec.distill_batch, distill, distill_dir=io.distill_dir, resume=io.resume, progress=progress)
    info["calib"] = spec.calib
    return info


def fit_student_(student: nn.Module, teacher: nn.Module, tokenizer, samples: list[str], fit: str = "aware",
                 ridge: float = 1e-4, max_length: int = 128, batch_size: int = 8, distill=None,
                 held_out_fraction: float = 0.1, distill_dir=None, resume: bool = False,
                 progress: bool = True) -> dict:
    """Fit (fit: frobenius = keep the projection, aware, sequential) and then optionally distil
    (distill: a distill.DistillConfig) the structured modules of `student` on calibration text.
    Distillation holds out the last `held_out_fraction` of the samples for its held-out KL."""
    if fit not in FITS:
        raise InputError(f"unknown fit {fit!r}; allowed: {', '.join(FITS)}", "fit")
    device = next(student.parameters()).device
    info = {"fit": fit, "samples": len(samples), "ridge": ridge, "max_length": max_length}
    n_held = int(len(samples) * held_out_fraction) if distill is not None else 0
    train = make_batches(tokenizer, samples[:len(samples) - n_held], batch_size, max_length, device)
    info["tokens"] = int(sum(b["attention_mask"].sum() for b in train))
    start = time.perf_counter()
    if fit == "aware":
        fit_aware_(student, teacher, train, ridge, progress)
    elif fit == "sequential":
        fit_sequential_(student, teacher, train, ridge, progress)
    info["fit_s"] = time.perf_counter() - start
    if distill is not None:
        held = make_batches(tokenizer, samples[len(samples) - n_held:], batch_size, max_length, device) if n_held else []
        start = time.perf_counter()
        result = distill_(student, teacher, train, held, distill, checkpoint_dir=distill_dir, resume=resume,
                          progress=progress)
        info["distill_s"] = time.perf_counter() - start
        info["distill"] = {k: v for k, v in result.items() if k not in ("loss", "trainable")}
        inside = tuple(f"{n}." for n in fitted_modules(student))
        info["extra_params"] = [n for n in trainable_parameters(student, distill.train_norms) if not n.startswith(inside)]
    return info
