"""Models bigger than memory: calibration and evaluation with one decoder layer loaded at a time.

The model is built on the meta device (accelerate's init_empty_weights: parameters take no memory,
the small buffers such as rotary frequencies are real). The embeddings, the final norm and the
head are read from the safetensors files; then each decoder layer in turn is read (safetensors
reads one tensor at a time), used on the cached hidden states of every calibration batch or
prompt, and put back on the meta device, in the style of GPTQ's sequential calibration.

    streamer, tokenizer = Streamer.open("smollm2-135m")
    summary = fit_streamed_(streamer, tokenizer, StudentSpec(layers="10-19", fit="sequential", calib="pydoc-all"))
    result = evaluate_streamed(streamer, tokenizer, prompts, summary["modules"])

Each layer runs exactly the computation of the in-memory path (calibrate.sequential_layer_ and
aware_layer_, the same batches, the model's own forward for masks, rotary embeddings, norm, head
and logit soft-capping), so the fitted weights and the metrics equal the in-memory run's.
What is kept between layers: the hidden states of the calibration batches (or prompts), the
fitted structured modules, the embeddings and the head. `Streamer.peak_bytes` records the most
parameter and buffer bytes materialised at any time. Not streamed (refused with a message):
distillation and the channel transforms (they need the whole model at once), greedy generation
(one forward per token through every layer) and calibration text the model writes itself.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..fit.calib_text import make_batches
from ..fit.closed_form import _model_inputs, _run_layer, _Stop, aware_layer_, sequential_layer_
from ..io.checkpoint import save_fitted
from ..errors import InputError
from .metrics import ZeroLinear, length_batches, length_groups, prompt_stats, summarize, with_floor
from ..io.models import load_tokenizer, model_source, not_in_cache, refuse_export, resolve_dtype, tensors_fingerprint
from ..fit.student import StudentIO, StudentSpec, block_config, calibration_text, config_for
from ..io.prompts import context_length, tokenize_prompts
from ..io.results import structured_params
from ..fit.reconstruct import reconstruct_layer_
from ..surgery import compress_, decoder_layers, layer_index, num_params, select_modules, set_module

SELF_WRITTEN = ("teacher", "mix", "self-chat", "self-seed")  # calibration sources the model generates: need the whole model


def model_folder(model_id: str) -> Path:
    """The safetensors folder a model id loads from (models.model_source: a GGUF is converted
    once, in memory, and cached; a Hugging Face id is its snapshot in the local cache)."""
    source, kw = model_source(model_id)
    if kw:  # a Hugging Face id
        from huggingface_hub import snapshot_download

        try:
            source = snapshot_download(model_id, local_files_only=True)
        except OSError:  # LocalEntryNotFoundError (an OSError, as load_model's): not cached here
            raise not_in_cache(model_id) from None
    refuse_export(source)
    path = Path(source)
    if not list(path.glob("*.safetensors")):
        raise InputError(f"{str(path)!r} holds no .safetensors file: streaming reads safetensors only", "model")
    return path


class Shards:
    """Tensor name -> safetensors file of a model folder; reads tensors one at a time."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = json.loads(index.read_text())["weight_map"]
            self.files = {name: folder / f for name, f in files.items()}
        else:
            from safetensors import safe_open

            self.files = {}
            for f in sorted(folder.glob("*.safetensors")):
                with safe_open(str(f), framework="pt") as handle:
                    self.files.update({name: f for name in handle.keys()})

    def read(self, names: list[str], dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
        """{name: tensor} in `dtype` on `device`. Each file is opened for this call only, so its
        memory map (and the pages read through it) is released when the call returns."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for f, group in by_file.items():
            with safe_open(str(f), framework="pt") as handle:
                for name in group:
                    out[name] = handle.get_tensor(name).to(device=device, dtype=dtype)
        return out


class Streamer:
    """A teacher and a student built on the meta device over one set of safetensors files.
    Parameters loaded for a layer are shared by the two (the student's replaced modules are its own)."""

    def __init__(self, folder: Path, dtype=torch.float32, device="cpu"):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.folder, self.dtype, self.device = Path(folder), resolve_dtype(dtype), torch.device(device)
        config = AutoConfig.from_pretrained(self.folder)
        with init_empty_weights(include_buffers=False):
            self.teacher = AutoModelForCausalLM.from_config(config, dtype=self.dtype).eval()
        self.teacher.tie_weights()  # (init_empty_weights gives tied weights separate meta parameters)
        for module in self.teacher.modules():  # buffers (rotary frequencies, embedding scales) are real
            for key, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[key] = buf.to(self.device)
        self.student = copy.deepcopy(self.teacher)
        for name, buf in self.teacher.named_buffers():  # one copy of each buffer, shared
            parent, _, leaf = name.rpartition(".")
            self.student.get_submodule(parent)._buffers[leaf] = buf
        self.shards = Shards(self.folder)
        self.prefix, layers = decoder_layers(self.teacher)
        self.num_layers = len(layers)
        self.tied = self._tied_names()
        self.peak_bytes = 0
        self.model_bytes = sum(p.numel() * p.element_size() for p in self.teacher.parameters())
        self.model_params = num_params(self.teacher)
        inside = {id(p) for p in layers.parameters()}
        self.outside_bytes = sum(p.numel() * p.element_size() for p in self.teacher.parameters() if id(p) not in inside)

    @classmethod
    def open(cls, model_id: str, dtype="float32", device="cpu"):
        """(Streamer, tokenizer) of a model id (as models.load_model takes); no weight is read yet."""
        folder = model_folder(model_id)
        return cls(folder, dtype, device), load_tokenizer(str(folder))

    def _tied_names(self) -> dict[str, str]:
        """{parameter name: the name it is stored under} (tied weights, e.g. the head and the embeddings)."""
        groups: dict[int, list[str]] = {}
        for name, p in self.teacher.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
        source = {}
        for names in groups.values():
            stored = [n for n in names if n in self.shards.files]
            if not stored:
                raise InputError(f"{str(self.folder)!r} holds no tensor {names[0]!r}: not a checkpoint of "
                                 f"this architecture", "model")
            source.update({n: stored[0] for n in names})
        return source

    def _names(self, layer: int | None) -> list[str]:
        """Parameter names of decoder layer `layer`, or (None) of everything outside the decoder layers."""
        inside = f"{self.prefix}."
        if layer is None:
            return [n for n in self.tied if not n.startswith(inside)]
        return [n for n in self.tied if n.startswith(f"{inside}{layer}.")]

    def load_(self, layer: int | None = None) -> None:
        """Read a decoder layer's parameters (None: embeddings, final norm, head) into both models;
        those already loaded are not read again."""
        names = [n for n in self._names(layer) if self.teacher.get_parameter(n).device.type == "meta"]
        tensors = self.shards.read(sorted({self.tied[n] for n in names}), self.dtype, self.device)
        params = {key: nn.Parameter(t, requires_grad=False) for key, t in tensors.items()}
        for name in names:
            _set_param(self.teacher, name, params[self.tied[name]])
            if _has_param(self.student, name):  # not where the student holds a structured module
                _set_param(self.student, name, params[self.tied[name]])
        self.peak_bytes = max(self.peak_bytes, self.materialised_bytes())

    def free_(self, layer: int) -> None:
        """Put a decoder layer's loaded parameters back on the meta device (structured modules stay)."""
        for name in self._names(layer):
            p = self.teacher.get_parameter(name)
            meta = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
            if _has_param(self.student, name):
                _set_param(self.student, name, meta)
            _set_param(self.teacher, name, meta)

    def materialised_bytes(self) -> int:
        """Bytes of the parameters and buffers of the two models that are not on the meta device."""
        seen, total = set(), 0
        for model in (self.teacher, self.student):
            for t in list(model.parameters()) + list(model.buffers()):
                if t.device.type != "meta" and id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
        return total

    def record(self) -> dict:
        """Peak parameter bytes loaded at once, beside the whole model's and those outside the decoder layers."""
        return {"peak_bytes": self.peak_bytes, "model_bytes": self.model_bytes, "outside_bytes": self.outside_bytes,
                "num_layers": self.num_layers}

    def layer(self, which: str, index: int) -> nn.Module:
        return getattr(self, which).get_submodule(self.prefix)[index]

    def fingerprint(self) -> str:
        """models.model_fingerprint of the teacher's weights, read one tensor at a time."""
        return tensors_fingerprint((name, self.shards.read([self.tied[name]], self.dtype, "cpu")[self.tied[name]])
                                   for name, _ in self.teacher.named_parameters())


def _has_param(model: nn.Module, name: str) -> bool:
    parent, _, leaf = name.rpartition(".")
    try:
        return leaf in model.get_submodule(parent)._parameters
    except AttributeError:
        return False


def _set_param(model: nn.Module, name: str, param: nn.Parameter) -> None:
    parent, _, leaf = name.rpartition(".")
    model.get_submodule(parent)._parameters[leaf] = param


# ---- running the model's own forward around the decoder layers ----

class _Stub(nn.Module):
    """Stands in for a decoder layer: hands its arguments to `call(index, hidden, args, kwargs)`."""

    def __init__(self, index: int, call):
        super().__init__()
        self.index, self.call = index, call

    def forward(self, hidden_states, *args, **kwargs):
        return self.call(self.index, hidden_states, args, kwargs)


@contextmanager
def _stubbed(model: nn.Module, prefix: str, call):
    layers = model.get_submodule(prefix)
    kept = list(layers)
    for i in range(len(kept)):
        layers[i] = _Stub(i, call)
    try:
        yield
    finally:
        for i, layer in enumerate(kept):
            layers[i] = layer


@torch.no_grad()
def layer_arguments(model: nn.Module, prefix: str, inputs: list[dict]) -> tuple[list, list]:
    """Per input (keyword arguments of the base model), the hidden state entering decoder layer 0,
    and per layer and input the other (args, kwargs) the model passes that layer (masks, rotary
    embeddings): what calibrate._decoder_inputs captures, without running any decoder layer."""
    hidden, extra = [], [[] for _ in model.get_submodule(prefix)]

    def call(index, h, args, kwargs):
        if index == 0:
            hidden.append(h)
        extra[index].append((args, kwargs))
        if index == len(extra) - 1:
            raise _Stop
        return h

    with _stubbed(model, prefix, call):
        for kw in inputs:
            try:
                model.base_model(**kw)
            except _Stop:
                pass
    return hidden, extra


@torch.no_grad()
def head_logits(model: nn.Module, prefix: str, input_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits when its last decoder layer outputs `hidden` (the model's own final
    norm, head and soft-capping run; the decoder layers do not)."""
    last = len(model.get_submodule(prefix)) - 1
    with _stubbed(model, prefix, lambda i, h, a, k: hidden if i == last else h):
        return model(input_ids=input_ids, use_cache=False).logits.float()


def _run(layer: nn.Module, hidden: list, extra: list) -> list:
    return [_run_layer(layer, h, e) for h, e in zip(hidden, extra)]


# ---- calibration, one layer at a time ----

def check_streamable(spec: StudentSpec, io: StudentIO) -> None:
    """Refuse what needs the whole model at once, before anything loads."""
    if spec.steps:
        raise InputError(f"distillation trains through the whole model at once and cannot stream; give "
                         f"distill_steps 0 (fit block then means the sequential fit plus block reconstruction), "
                         f"got {spec.steps} steps", "distill_steps")
    if spec.transform != "none":
        raise InputError("the channel transforms are searched on the whole model and cannot stream: leave "
                         "transform none", "transform")
    if spec.fit != "frobenius" and spec.calib in SELF_WRITTEN:
        raise InputError(f"calibration text {spec.calib!r} is written by the model itself, which needs the whole "
                         f"model for every token: use calib pydoc-all, pydoc or a text file", "calib")
    if io.load:
        raise InputError("a saved student loads in memory (bcllm.load_student); streaming builds and fits one",
                         "load")


def _selection(streamer: Streamer, config) -> dict[int, list[str]]:
    """{layer: [full names of its selected linear modules]}, checked on the meta model."""
    selected = select_modules(streamer.teacher, config.targets, config.layers)
    if not selected:
        raise InputError(f"targets {config.targets!r} with layers {config.layers!r} select no module", "layers")
    by_layer: dict = {}
    for name, linear in selected.items():
        config.check(name, linear)
        by_layer.setdefault(layer_index(name, streamer.prefix), []).append(name)
    if None in by_layer:
        raise InputError(f"streaming compresses modules inside decoder layers only; {by_layer[None][0]!r} is "
                         f"outside", "targets")
    return by_layer


@dataclasses.dataclass
class _Calibration:
    batches: list
    masks: list
    hidden: list
    extra: list
    info: dict


def _calibration(streamer: Streamer, tokenizer, spec: StudentSpec, io: StudentIO, eval_prompts, model_id: str,
                 progress: bool) -> _Calibration:
    """The calibration batches (as fit.student.fit_and_distill_ makes them) and what enters decoder layer 0."""
    samples = calibration_text(None, tokenizer, spec, io, eval_prompts, model_id, progress)
    max_length = spec.calib_tokens + 64
    batches = make_batches(tokenizer, samples[:spec.fit_samples], spec.distill_batch, max_length, streamer.device)
    inputs = [_model_inputs(b) for b in batches]
    hidden, extra = layer_arguments(streamer.teacher, streamer.prefix, inputs)
    info = {"fit": spec.fit, "samples": len(samples), "ridge": spec.ridge, "max_length": max_length,
            "tokens": int(sum(b["attention_mask"].sum() for b in batches)), "calib": spec.calib}
    return _Calibration(batches, [b.get("attention_mask") for b in batches], hidden, extra, info)


def _merge(summaries: list[dict], order: list[str], model_params: int) -> dict:
    """compress_'s summary for the whole model from its per-layer summaries."""
    sizes = {}
    for s in summaries:
        sizes.update(s["sizes"])
    replaced = sum(s["replaced_params"] for s in summaries)
    compressed = sum(structured_params(s) for s in summaries)
    budgets = [s["budget_params"] for s in summaries]
    return {"config": None, "modules": [n for n in order if n in sizes], "num_modules": len(sizes),
            "sizes": {n: sizes[n] for n in order if n in sizes},
            "budget_params": None if None in budgets else sum(budgets), "replaced_params": replaced,
            "structured_params": compressed, "ratio": replaced / max(compressed, 1),
            "structured_bytes": sum(s["structured_bytes"] for s in summaries),
            "model_params_before": model_params, "model_params_after": model_params - replaced + compressed}


@torch.no_grad()
def fit_streamed_(streamer: Streamer, tokenizer, spec: StudentSpec, io: StudentIO = StudentIO(), *,
                  eval_prompts: list[str] | None = None, model_id: str = "", progress: bool = True) -> dict:
    """Compress and fit streamer.student as pipeline.build_student would (fit frobenius, aware,
    sequential, or block with distill_steps 0), one decoder layer loaded at a time; returns the
    summary build_student returns, plus "stream": peak and whole-model parameter bytes."""
    check_streamable(spec, io)
    config = config_for(spec)
    by_layer = _selection(streamer, config)
    cal = None
    if spec.fit != "frobenius":  # the calibration inputs need the embeddings; a Frobenius projection does not
        streamer.load_()
        cal = _calibration(streamer, tokenizer, spec, io, eval_prompts, model_id, progress)
    refine = _refine(spec) if spec.fit == "block" else None
    h_s = h_t = cal.hidden if cal else None
    summaries, refined, tokens, start = [], [], 0, time.perf_counter()
    for li in tqdm(range(max(by_layer) + 1), desc="streamed fit", unit="layer", disable=not progress):
        if cal is None and li not in by_layer:
            continue
        streamer.load_(li)
        layer_s, layer_t = streamer.layer("student", li), streamer.layer("teacher", li)
        names = [n[len(f"{streamer.prefix}.{li}."):] for n in by_layer.get(li, [])]
        if names:
            summaries.append(compress_(streamer.student, dataclasses.replace(config, layers=str(li))))
        if spec.fit == "aware":
            h_t, n = aware_layer_(layer_s, layer_t, names, h_t, cal.extra[li], cal.masks, spec.ridge)
        elif cal is not None:
            h_s, h_t, n, result = sequential_layer_(li, layer_s, layer_t, names, h_s, h_t, cal.extra[li],
                                                    cal.masks, spec.ridge, refine)
            refined += [result] if result is not None else []
        tokens = (n if cal is not None and names else 0) or tokens
        streamer.peak_bytes = max(streamer.peak_bytes, streamer.materialised_bytes())
        streamer.free_(li)
    summary = _merge(summaries, [n for li in sorted(by_layer) for n in by_layer[li]], streamer.model_params)
    summary.update(config=config.describe(), fit=spec.fit)
    if cal is not None:
        summary["calibration"] = _fit_info(cal.info, spec, refined, tokens, time.perf_counter() - start)
    summary["stream"] = streamer.record()
    if io.save:
        from ..io.artifact import base_record

        save_fitted(streamer.student, io.save, config, streamer.fingerprint(), [], info=summary,
                    base=base_record(model_id) if model_id else None)
    return summary


def _refine(spec: StudentSpec):
    """fit block: block reconstruction of each layer after its closed form (reconstruct.reconstruct_)."""
    cfg = block_config(spec)
    return lambda layer: reconstruct_layer_(layer, cfg)


def _fit_info(info: dict, spec: StudentSpec, refined: list, tokens: int, seconds: float) -> dict:
    """pipeline.fit_student_'s record of the fit."""
    info = dict(info, fit_s=seconds)
    if spec.fit == "block":
        info["block"] = {"fit": "block", "tokens": tokens, "ridge": spec.ridge, "layers": refined,
                         "block": vars(block_config(spec)).copy(), "block_s": seconds}
    return info


# ---- evaluation, one layer at a time ----

def _prompt_groups(token_ids: list[list[int]], device) -> list[tuple[list[int], torch.Tensor]]:
    """(prompt indices, (B, L) ids): the unpadded equal-length groups evaluate.run_batch runs together,
    within the batches TeacherCache.build and evaluate cut (length_batches, their defaults)."""
    groups = []
    for batch in length_batches(token_ids):
        for group in length_groups([token_ids[i] for i in batch]):
            rows = [batch[k] for k in group]
            groups.append((rows, torch.tensor([token_ids[i] for i in rows], device=device)))
    return groups


def _run_floor(layer: nn.Module, names: list[str], hidden: list, extra: list) -> list:
    """The layer with its modules `names` removed (evaluate.ZeroLinear), run, then restored."""
    kept = {n: layer.get_submodule(n) for n in names}
    for n, m in kept.items():
        set_module(layer, n, ZeroLinear(m.out_features))
    try:
        return _run(layer, hidden, extra)
    finally:
        for n, m in kept.items():
            set_module(layer, n, m)


@torch.no_grad()
def _final_hidden(streamer: Streamer, groups: list, modules: list[str], floor: bool, progress: bool):
    """Per group the hidden states leaving the last decoder layer: teacher, student, floor."""
    rel: dict[int, list[str]] = {}
    for name in modules:
        li = layer_index(name, streamer.prefix)
        rel.setdefault(li, []).append(name[len(f"{streamer.prefix}.{li}."):])
    hidden, extra = layer_arguments(streamer.teacher, streamer.prefix,
                                    [{"input_ids": ids, "use_cache": False} for _, ids in groups])
    t = s = f = hidden
    for li in tqdm(range(streamer.num_layers), desc="streamed evaluation", unit="layer", disable=not progress):
        streamer.load_(li)
        layer_t, layer_s, names = streamer.layer("teacher", li), streamer.layer("student", li), rel.get(li, [])
        new_t = _run(layer_t, t, extra[li])
        new_s = new_t if s is t and not names else _run(layer_s, s, extra[li])
        if floor:
            f = new_t if f is t and not names else _run_floor(layer_t, names, f, extra[li])
        t, s = new_t, new_s
        streamer.peak_bytes = max(streamer.peak_bytes, streamer.materialised_bytes())
        streamer.free_(li)
    return t, s, f


@torch.no_grad()
def evaluate_streamed(streamer: Streamer, tokenizer, prompts: list[str], modules: list[str], *,
                      chat: bool = False, floor: bool = True, seed: int = 0, resamples: int = 1000,
                      progress: bool = True) -> dict:
    """evaluate.evaluate's teacher-forced result (no generation: max_new_tokens 0) for the student
    fitted by fit_streamed_ and the teacher, run side by side one decoder layer at a time; with
    floor, evaluate.measure_floor's figures (the same `modules` removed) in the metrics."""
    token_ids = tokenize_prompts(tokenizer, prompts, context_length(streamer.teacher), chat)
    groups = _prompt_groups(token_ids, streamer.device)
    streamer.load_()
    t, s, f = _final_hidden(streamer, groups, modules, floor, progress)
    stats, floor_stats = [None] * len(token_ids), [None] * len(token_ids)
    for g, (rows, ids) in enumerate(groups):
        z_t = head_logits(streamer.teacher, streamer.prefix, ids, t[g])
        z_s = head_logits(streamer.teacher, streamer.prefix, ids, s[g])
        z_f = head_logits(streamer.teacher, streamer.prefix, ids, f[g]) if floor else None
        for k, i in enumerate(rows):
            stats[i] = prompt_stats(z_t[k], z_s[k], ids[k], [], [])
            if floor:
                floor_stats[i] = prompt_stats(z_t[k], z_f[k], ids[k], [], [])
    metrics, ci, per_prompt = summarize(stats, 0, resamples, seed)
    if floor:
        fm = summarize(floor_stats, 0, 10, seed)[0]
        metrics = with_floor(metrics, {"floor_token_agreement": fm["token_agreement"], "floor_kl_mean": fm["kl_mean"]})
    for i, row in enumerate(per_prompt):
        row.update(prompt=prompts[i], teacher_generation="", student_generation="")
    return {"metrics": metrics, "ci": ci, "per_prompt": per_prompt, "num_prompts": len(token_ids),
            "num_positions": sum(len(x) for x in token_ids), "max_new_tokens": 0, "teacher_cache": None,
            "stream": streamer.record()}
