"""Save and load fitted students: only what differs from the original model.

A folder holds
  fitted.safetensors  the state of every structured module (and any other trained parameter,
                      e.g. norms after distillation), under their full names; the factors of the
                      adapters merged into dense linears ("adapter.<linear>.lora_a/b", distill.ADAPTERS);
  fitted.json         the config (its class name and fields), the module names and types, the
                      fingerprint of the original weights, and how the fit was made.
Loading rebuilds the modules on a fresh original model with `compress_(model, config)` (any
structure: the config class is looked up in the structures registry), then loads the saved tensors over them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import dist
from ..errors import InputError, InputFileError
from ..structures.base import config_class, fitted_modules
from ..structures.circulant import int8_spectra_modules, rounded_c
from ..surgery import compress_
from ..fit.distill import ADAPTERS, merge_factors_
from ..fit.transforms import Transform, apply_transform_
from .results import atomic_write, command_line, file_sha256, read_json, versions, write_json

FORMAT = 1
FORMAT_ADAPTERS = 2  # folders with adapter factors: a bcllm that cannot merge them refuses by format
FORMAT_INT8_SPECTRA = 3  # circulant modules with int8 spectra (config spectra_bits 8): refused by format before
FORMATS = (FORMAT, FORMAT_ADAPTERS, FORMAT_INT8_SPECTRA)


@dist.on_main  # under torchrun rank 0 writes; the other ranks wait for it
def save_fitted(student, folder, config, original_fingerprint: str = "", extra_params=(), info=None,
                base: dict | None = None, transform: Transform | None = None) -> Path:
    """Write the structured modules of `student` (plus named `extra_params`) to `folder`; `base` is the
    record of the base model (bcllm.artifact.base_record), which lets load_student find it again;
    `transform` (transforms.Transform) the channel reordering applied to the base before compressing."""
    if not dataclasses.is_dataclass(config):
        raise InputError(f"config must be a dataclass config (CirculantConfig, ...), got {type(config).__name__}")
    folder = Path(folder)
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "fitted.safetensors").exists():
        raise InputFileError(f"{str(folder)!r} is a folder with other files in it, not a saved student; "
                             f"save into a new or empty folder", "save")
    if folder.exists() and not folder.is_dir():
        raise InputFileError(f"cannot save a student to {str(folder)!r}: it is a file", "save")
    folder.mkdir(parents=True, exist_ok=True)
    modules = fitted_modules(student)
    if not modules:
        raise InputError("the student has no structured module to save: compress it first")
    tensors = {f"{name}.{k}": v.detach().contiguous().cpu() for name, m in modules.items()
               for k, v in m.state_dict().items()}
    # int8 spectra: c on its grid (rounded_c), so the folder holds the function the student computes
    # (the student itself is left as it is: under torchrun only rank 0 saves)
    int8_spectra = [n for n in int8_spectra_modules(student) if f"{n}.c" in tensors]
    for name in int8_spectra:
        tensors[f"{name}.c"] = rounded_c(student.get_submodule(name).c.detach()).contiguous().cpu()
    params = dict(student.named_parameters())
    for name in extra_params:
        tensors[name] = params[name].detach().contiguous().cpu()
    tensors.update(transform.tensors() if transform is not None else {})
    for name, (a, b) in getattr(student, ADAPTERS, {}).items():
        tensors[f"adapter.{name}.lora_a"], tensors[f"adapter.{name}.lora_b"] = a.contiguous().cpu(), b.contiguous().cpu()
    # fitted.json goes last and names the tensors file's size and hash: a folder whose save was
    # killed has no fitted.json (an earlier one is removed first) or a mismatch, never a wrong student
    (folder / "fitted.json").unlink(missing_ok=True)
    atomic_write(folder / "fitted.safetensors", lambda tmp: save_file(tensors, tmp))
    write_json(folder / "fitted.json", {
        "format": FORMAT_INT8_SPECTRA if int8_spectra else FORMAT_ADAPTERS if getattr(student, ADAPTERS, {}) else FORMAT,
        "config_type": type(config).__name__, "config": dataclasses.asdict(config),
        "modules": {name: type(m).__name__ for name, m in modules.items()}, "extra_params": list(extra_params),
        "original_fingerprint": original_fingerprint, "info": info or {}, "base": base, "versions": versions(),
        "command": command_line(), "tensors_file": file_digest(folder / "fitted.safetensors")})
    return folder


DAMAGED = "save the student again (the folder is damaged or its save was interrupted)"


def read_meta(folder, param: str) -> dict:
    """A student folder's fitted.json, or an InputFileError naming what is missing or damaged
    (`param`: the option that named the folder)."""
    path = Path(folder) / "fitted.json"
    if not path.is_file():
        raise InputFileError(f"{str(folder)!r} holds no fitted student (no fitted.json); save one with the "
                             f"save option (--save, checkpoint.save_fitted)", param)
    return read_json(path, "student file", DAMAGED)


def file_digest(path) -> dict:
    """Size and sha256 of a file (a saved student's tensors: checked before they are read)."""
    return {"bytes": Path(path).stat().st_size, "sha256": file_sha256(path)}


def _read_tensors(path: Path, expected: dict | None, fix: str, device: str) -> dict:
    """The tensors of a student folder, or an InputFileError naming the file: missing, not the
    file fitted.json was written with (size, hash), or not readable as safetensors."""
    if not path.is_file():
        raise InputFileError(f"student file {str(path)!r} is missing; {fix}", "load")
    if expected is not None and file_digest(path) != expected:
        raise InputFileError(f"student file {str(path)!r} is not the file fitted.json was saved with "
                             f"(size or hash differ: truncated or changed); {fix}", "load")
    try:
        return load_file(str(path), device=device)
    except Exception as e:  # safetensors raises its own error types for a damaged header or body
        raise InputFileError(f"student file {str(path)!r} is damaged ({type(e).__name__}: {e}); {fix}",
                             "load") from None


def _merge_adapters(model, adapters: dict, folder) -> None:
    """Fold the saved adapter factors {"<linear>.lora_a" / ".lora_b": tensor} into the model's dense
    linears (weight += B A, as distillation merged them) and record them in its ADAPTERS."""
    record = {}
    for key in sorted(k for k in adapters if k.endswith(".lora_a")):
        name = key[:-len(".lora_a")]
        a, b = adapters[key], adapters.get(f"{name}.lora_b")
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if not isinstance(linear, torch.nn.Linear) or b is None or b.shape != (linear.out_features, a.shape[0]) \
                or a.shape[1] != linear.in_features:
            raise InputError(f"saved adapter {name!r} in {str(folder)!r} does not fit this model (no such dense "
                             f"linear, or other shapes): load it on the model it was made from")
        merge_factors_(linear, a, b)
        record[name] = (a, b)
    if record:
        setattr(model, ADAPTERS, record)


def load_fitted(model, folder, check_fingerprint: bool = True) -> dict:
    """Turn a fresh original `model` into the saved student, in place; returns compress_'s summary
    plus the saved "info". Refuses a folder saved from other original weights."""
    from .models import model_fingerprint

    folder = Path(folder)
    meta_path = folder / "fitted.json"
    meta, fix = read_meta(folder, "load"), DAMAGED
    if meta.get("format") not in FORMATS:
        raise InputError(f"{str(meta_path)!r} has format {meta.get('format')}, this bcllm reads {FORMAT}, "
                         f"{FORMAT_ADAPTERS} (with adapters) and {FORMAT_INT8_SPECTRA} (int8 spectra)")
    if check_fingerprint and meta.get("original_fingerprint"):
        if model_fingerprint(model) != meta["original_fingerprint"]:
            raise InputError(f"{str(folder)!r} was fitted on other original weights than this model's; "
                             f"load it on the model it was made from")
    try:
        config = config_class(meta["config_type"])(**meta["config"])
    except (KeyError, TypeError) as e:
        raise InputFileError(f"student file {str(meta_path)!r} is damaged (its config: {e}); {fix}", "load") from None
    tensors = _read_tensors(folder / "fitted.safetensors", meta.get("tensors_file"), fix,
                            str(next(model.parameters()).device))
    transform = Transform.from_tensors(tensors)  # the reordering the student was fitted on comes first
    apply_transform_(model, transform)
    adapters = {k[len("adapter."):]: v for k, v in tensors.items() if k.startswith("adapter.")}
    tensors = {k: v for k, v in tensors.items() if not k.startswith(("transform.", "adapter."))}
    summary = compress_(model, config)
    built = {name: type(m).__name__ for name, m in fitted_modules(model).items()}
    if built != meta["modules"]:
        raise InputError(f"rebuilding {str(folder)!r} gave other modules than were saved "
                         f"({len(built)} vs {len(meta['modules'])}): the model does not match")
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, tensor in tensors.items():
        if name not in state:
            raise InputError(f"saved tensor {name!r} has no place in this model")
        if state[name].shape != tensor.shape:
            raise InputError(f"{name}: saved shape {tuple(tensor.shape)} != model shape {tuple(state[name].shape)}")
    with torch.no_grad():  # in place, so version counters move and cached spectra are rebuilt
        for name, tensor in tensors.items():
            state[name].copy_(tensor)
    _merge_adapters(model, adapters, folder)
    summary["fit"] = meta.get("info", {}).get("fit", "loaded")
    summary["loaded_from"] = str(folder)
    summary["info"] = meta.get("info", {})
    return summary
