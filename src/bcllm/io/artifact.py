"""A fitted student as a reusable artifact: its base-model record, reloading it, exporting it.

`save_fitted(..., base=base_record(model_id))` records which model a student was fitted on, so
`load_student(folder)` can rebuild it without being told. `export_student` turns a student folder
into a self-contained Hugging Face folder that `AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)` loads without bcllm (modeling code: hf_template/modeling_bcllm.py, which
imports the circulant math from a verbatim copy of ops/circulant_math.py beside it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .. import dist
from ..errors import InputError
from .models import EMBEDDED, load_model, resolve_model
from .results import atomic_write, file_sha256

TEMPLATE = Path(__file__).parent / "hf_template" / "modeling_bcllm.py"
# Copied verbatim beside the modeling file, which imports it relatively: one source of the circulant math.
CIRCULANT_MATH = Path(__file__).parents[1] / "ops" / "circulant_math.py"
# The structured module types the exported modeling code implements (rebuilt from their sizes()).
EXPORTABLE = ("BlockCirculantLinear", "LowRankLinear", "BlockDiagonalLinear", "CirculantPlusLowRankLinear")
# The weights are saved as this variant (model.bcllm.safetensors; the template's WEIGHTS_VARIANT):
# a dense load of the folder without trust_remote_code finds no model.safetensors and fails.
WEIGHTS_VARIANT = "bcllm"


def _cached_revision(repo_id: str) -> str | None:
    """The snapshot (commit) of a Hugging Face id in the local cache, if one holds its config.json."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an odd id or cache layout: the revision is a nicety, never a failure
        return None
    return Path(found).parent.name if isinstance(found, str) else None


def base_record(model_id: str) -> dict:
    """Where a base model came from: {"spec", "kind": embedded|gguf|folder|hf, "gguf_sha256",
    "hf_revision"}; "spec" is the model id (the key saved files have always used). File and folder
    ids are stored as absolute paths, so the record works from any directory."""
    kind, path = resolve_model(model_id)
    record = {"spec": model_id, "kind": kind, "gguf_sha256": None, "hf_revision": None}
    if model_id in EMBEDDED:
        record["kind"] = "embedded"
    elif path is not None:
        record["spec"] = str(path.resolve())
    if kind == "gguf":
        record["gguf_sha256"] = file_sha256(path)
    elif kind == "hub":
        record["kind"], record["hf_revision"] = "hf", _cached_revision(model_id)
    return record


def _read_meta(folder: Path) -> dict:
    from .checkpoint import read_meta

    return read_meta(folder, "folder")


def _check_gguf(base: dict, folder: Path) -> None:
    """Refuse a GGUF base whose bytes differ from the file the student was fitted on."""
    expected = base.get("gguf_sha256")
    if not expected:
        return
    _, path = resolve_model(base["spec"])
    actual = file_sha256(path)
    if actual != expected:
        raise InputError(f"the base model file {str(path)!r} has sha256 {actual}, but the student in "
                         f"{str(folder)!r} was fitted on a file with sha256 {expected}: the file changed; "
                         f"pass the original model explicitly (model=... / --model)", "model")


def load_student(folder, device="cpu", dtype="float32", model: str | None = None):
    """Load a student saved with `--save DIR` (bcllm.io.checkpoint.save_fitted): the base model it
    was fitted on (recorded in fitted.json, or `model`, any model id load_model accepts) with the
    fitted structured modules applied.

    Returns (student, tokenizer, summary): summary is load_fitted's (modules, parameter counts,
    fit info) plus "base", the base-model record. Raises InputError (a ValueError) when the
    folder records no base (older bcllm) and no `model` is given, or when a recorded GGUF file
    has changed.
    """
    from .checkpoint import load_fitted

    folder = Path(folder)
    base = _read_meta(folder).get("base")
    if model is None:
        if not base:
            raise InputError(f"{str(folder)!r} does not record its base model (saved by an older bcllm); "
                             f"pass the model it was fitted on: load_student({str(folder)!r}, model=MODEL_ID) "
                             f"or --model MODEL_ID", "model")
        _check_gguf(base, folder)
        model = base["spec"]
    else:
        base = base_record(model)
    student, tokenizer = load_model(model, dtype=dtype, device=device)
    summary = load_fitted(student, folder)
    summary["base"] = base
    return student, tokenizer, summary


def module_entries(student) -> dict:
    """{module name: {"type", "in_features", "out_features", "bias", sizes...}} of the structured
    modules: what the exported modeling code needs to rebuild them."""
    from ..structures.base import fitted_modules

    entries = {}
    for name, m in fitted_modules(student).items():
        kind = type(m).__name__
        if kind not in EXPORTABLE:
            raise InputError(f"{name}: cannot export a {kind} (exportable: {', '.join(EXPORTABLE)})", "student_dir")
        entries[name] = {"type": kind, "in_features": m.in_features, "out_features": m.out_features,
                         "bias": m.bias is not None, **m.sizes()}
    return entries


def _write_config(out: Path, student, entries: dict, base: dict) -> None:
    """Point config.json's AutoModelForCausalLM at the exported modeling code. model_type stays the
    base's, so AutoConfig and AutoTokenizer load the folder without remote code (no prompt); a
    dense model load without trust_remote_code fails loudly because the weights are a variant
    (WEIGHTS_VARIANT), not model.safetensors."""
    path = out / "config.json"
    config = json.loads(path.read_text())
    config["architectures"] = ["BcllmForCausalLM"]
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_bcllm.BcllmForCausalLM"}
    config["bcllm_modules"] = entries
    config["bcllm_base"] = base
    head = student.get_output_embeddings()
    if head is not None and type(head).__name__ in EXPORTABLE:  # a structured lm_head cannot be tied to embeddings
        config["tie_word_embeddings"] = False
    atomic_write(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


@dist.on_main  # under torchrun rank 0 writes; the other ranks wait for it
def export_model(student, tokenizer, out_dir, base: dict | None = None) -> Path:
    """Write an in-memory student (a base model after compress_ / load_fitted) and its tokenizer
    as a self-contained Hugging Face folder; `base` is recorded in config.json as bcllm_base."""
    from ..structures.circulant import bake_spectra_

    out = Path(out_dir)
    bake_spectra_(student)  # int8 spectra: c on their grid (the same function), as the exported code knows only c
    entries = module_entries(student)
    student.save_pretrained(out, variant=WEIGHTS_VARIANT)
    tokenizer.save_pretrained(out)
    shutil.copyfile(TEMPLATE, out / "modeling_bcllm.py")
    shutil.copyfile(CIRCULANT_MATH, out / CIRCULANT_MATH.name)
    _write_config(out, student, entries, base)
    return out


def export_student(student_dir, out_dir, model: str | None = None) -> Path:
    """Write the student saved in `student_dir` (--save) as a self-contained Hugging Face folder
    `out_dir`: config.json (the base config, auto_map, bcllm_modules), model.bcllm.safetensors
    (the compressed weights), tokenizer files, modeling_bcllm.py with circulant_math.py, and
    bcllm_fitted.json (provenance).

    Load it anywhere, without bcllm: AutoModelForCausalLM.from_pretrained(out_dir,
    trust_remote_code=True). `model` overrides the recorded base model as in load_student.
    Refuses a non-empty `out_dir`; returns its path.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{str(out)!r} is not empty; export into a new folder", "out_dir")
    student, tokenizer, summary = load_student(student_dir, model=model)
    export_model(student, tokenizer, out, summary["base"])
    if dist.is_main():
        shutil.copyfile(Path(student_dir) / "fitted.json", out / "bcllm_fitted.json")
    return out
