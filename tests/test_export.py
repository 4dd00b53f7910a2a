"""Fitted students as artifacts: the base-model record, load_student, and the Hugging Face export
that loads without bcllm (in a subprocess where `import bcllm` fails) with the same logits."""

import ast
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bcllm import BlockDiagonalConfig, CirculantConfig, HybridConfig, InputError, LowRankConfig, compress_
from bcllm.io.artifact import base_record, export_student, load_student
from bcllm.fit.closed_form import fitted_modules
from bcllm.io.checkpoint import save_fitted
from bcllm.io.models import model_fingerprint
from conftest import tiny_model

CASES = {  # name: (arch, config)
    "llama-circulant": ("llama", lambda: CirculantConfig(block_size=16)),
    "llama-circulant-padded": ("llama", lambda: CirculantConfig(block_size=10, targets=("mlp", "attn"))),
    "llama-lowrank": ("llama", lambda: LowRankConfig(rank=8)),
    "llama-blockdiag": ("llama", lambda: BlockDiagonalConfig(num_blocks=5)),
    "llama-hybrid": ("llama", lambda: HybridConfig(block_size=16, rank=4)),
    "llama-tied-head": ("llama", lambda: CirculantConfig(block_size=16, targets=("lm_head", "down_proj"))),
    "qwen2-circulant-padded": ("qwen2", lambda: CirculantConfig(block_size=12, targets=("mlp", "attn"))),
    "gemma3-hybrid": ("gemma3", lambda: HybridConfig(block_size=10, rank=3, targets=("mlp", "attn"))),
}
INPUTS = {"batch": torch.arange(24).reshape(2, 12) * 5 % 128,   # 24 rows: more than the kernel takes
          "decode": torch.tensor([[3, 17, 99]])}                 # 3 rows: bcllm's real path


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def base_folder(arch, path):
    """A tiny random model saved as a Hugging Face folder (a valid base spec); Llama with tied
    embeddings like SmolLM2."""
    model = tiny_model(arch, layers=2)
    if arch == "llama":
        from transformers import AutoModelForCausalLM

        model.config.tie_word_embeddings = True
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(model.config).eval()
        assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def make_student(arch, config, root):
    """(student dir, bcllm student) fitted on a tiny base folder under root."""
    from bcllm.io.models import load_model

    base = base_folder(arch, root / f"base-{arch}")
    student, _ = load_model(base)
    fingerprint = model_fingerprint(student)
    compress_(student, config)
    with torch.no_grad():  # move every structured parameter off its projection, biases included
        for name, p in student.named_parameters():
            if not name.endswith("weight"):
                p.add_(0.01 * torch.randn_like(p))
    folder = save_fitted(student, root / "student", config, fingerprint, base=base_record(base))
    return folder, student


LOAD = r"""
import json, os, sys, torch
sys.modules["bcllm"] = None  # the export must not need bcllm
from transformers import AutoModelForCausalLM
dirs, inputs, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
results = {}
for name, d in dirs.items():
    model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
    with torch.no_grad():
        results[name] = {k: model(torch.tensor(ids)).logits for k, ids in inputs.items()}
    if name == "llama-circulant":  # generation, a re-saved copy, and a refusal without remote code
        ids = torch.tensor(inputs["decode"])
        results["generate"] = model.generate(ids, max_new_tokens=4, do_sample=False)
        model.save_pretrained(out + ".resaved")
        again = AutoModelForCausalLM.from_pretrained(out + ".resaved", trust_remote_code=True)
        results["resaved"] = again(ids).logits
        results["resaved_files"] = sorted(os.listdir(out + ".resaved"))
        try:  # the weights are model.bcllm.safetensors: a dense load finds none
            AutoModelForCausalLM.from_pretrained(d, trust_remote_code=False)
            results["refused"] = False
        except OSError as e:
            results["refused"] = "no file named model.safetensors" in str(e)
assert not any(m.startswith("bcllm") for m in sys.modules if sys.modules[m] is not None)
torch.save(results, out)
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case exported, then loaded once in a subprocess without bcllm: (students, results)."""
    root = tmp_path_factory.mktemp("export")
    students, dirs = {}, {}
    for name, (arch, config) in CASES.items():
        folder, student = make_student(arch, config(), root / name)
        dirs[name] = str(export_student(folder, root / name / "hf"))
        students[name] = student
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HF_MODULES_CACHE=str(root / "modules"))
    out = root / "logits.pt"
    inputs = {k: v.tolist() for k, v in INPUTS.items()}
    subprocess.run([sys.executable, "-c", LOAD, json.dumps(dirs), json.dumps(inputs), str(out)],
                   env=env, cwd=root, check=True, timeout=600)
    return students, dirs, torch.load(out)


@pytest.mark.parametrize("name", list(CASES))
def test_export_loads_without_bcllm_with_same_logits(exported, name):
    students, dirs, results = exported
    for key, ids in INPUTS.items():
        with torch.no_grad():
            expected = students[name](ids).logits
        torch.testing.assert_close(results[name][key], expected, rtol=0, atol=1e-5)
    config = json.loads((Path(dirs[name]) / "config.json").read_text())
    assert config["model_type"].startswith(CASES[name][0])  # the base's: AutoConfig needs no remote code
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_bcllm.BcllmForCausalLM"}
    assert (Path(dirs[name]) / "model.bcllm.safetensors").is_file()
    assert not (Path(dirs[name]) / "model.safetensors").exists()
    assert set(config["bcllm_modules"]) == set(fitted_modules(students[name]))


def test_an_exported_folder_as_the_model_to_compress_is_refused_with_directions(exported, capsys):
    from bcllm.cli import main

    _, dirs, _ = exported
    base = json.loads((Path(dirs["llama-circulant"]) / "config.json").read_text())["bcllm_base"]["spec"]
    assert main(["eval", "--model", dirs["llama-circulant"], "--max-new-tokens", "0"]) == 2
    err = capsys.readouterr().err
    assert "compressed student exported by bcllm" in err and f"--model {base} --load" in err
    assert "Traceback" not in err and "model.safetensors" not in err


def test_export_generates_resaves_and_refuses_without_remote_code(exported):
    students, _, results = exported
    student, ids = students["llama-circulant"], INPUTS["decode"]
    with torch.no_grad():
        expected = student.generate(ids, max_new_tokens=4, do_sample=False)
        torch.testing.assert_close(results["resaved"], student(ids).logits, rtol=0, atol=1e-5)
    assert torch.equal(results["generate"], expected)
    assert results["refused"]
    assert {"modeling_bcllm.py", "circulant_math.py", "model.bcllm.safetensors"} <= set(results["resaved_files"])


PLAIN = r"""
import sys
sys.modules["bcllm"] = None
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
print("IDS", tokenizer(sys.argv[2])["input_ids"])
try:
    AutoModelForCausalLM.from_pretrained(sys.argv[1])
    print("DENSE LOADED")
except OSError as e:
    print("DENSE REFUSED", e)
"""


def test_export_tokenizer_loads_without_remote_code_or_prompt(exported, tmp_path):
    """AutoTokenizer.from_pretrained(DIR) with no trust_remote_code, no terminal and no bcllm: no
    custom-code prompt, no model-type warning, the base tokenizer's ids; a plain dense model load
    of the folder still fails loudly (no silent load of the dense base with missing weights)."""
    d, text = exported[1]["llama-circulant"], "w5 w7 w100 w3 nope w127"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    run = subprocess.run([sys.executable, "-c", PLAIN, d, text], stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    for bad in ("custom code", "y/N", "You are using a model of type", "trust_remote_code"):
        assert bad not in output, output
    assert f"IDS {tiny_tokenizer()(text)['input_ids']}" in run.stdout
    assert "DENSE REFUSED" in run.stdout and "no file named model.safetensors" in run.stdout, output


def test_export_copies_the_circulant_math_verbatim_and_the_template_has_none_of_its_own(exported):
    """One source of truth: the exported folder's circulant_math.py is the package's file, byte for
    byte, and the modeling file computes no transform itself."""
    import bcllm.ops.circulant_math as circulant_math
    from bcllm.io.artifact import TEMPLATE

    package_file = Path(circulant_math.__file__).read_bytes()
    for d in exported[1].values():
        assert (Path(d) / "circulant_math.py").read_bytes() == package_file
        assert (Path(d) / "modeling_bcllm.py").read_bytes() == TEMPLATE.read_bytes()
    template = TEMPLATE.read_text()
    assert "from .circulant_math import" in template and "torch.fft" not in template
    names = {n.attr if isinstance(n, ast.Attribute) else n.id for n in ast.walk(ast.parse(template))
             if isinstance(n, (ast.Attribute, ast.Name))}
    assert not names & {"fft", "rfft", "irfft", "lru_cache", "_version", "data_ptr"}, names
    imports = {n.split(".")[0] for n in re.findall(r"^(?:import|from) (\S+)", package_file.decode(), re.M)}
    assert imports <= {"functools", "math", "torch"}, imports


def test_load_student_round_trip(tmp_path):
    folder, student = make_student("llama", LowRankConfig(rank=8), tmp_path)
    meta = json.loads((folder / "fitted.json").read_text())
    assert meta["base"]["kind"] == "folder" and os.path.isabs(meta["base"]["spec"])
    loaded, tokenizer, summary = load_student(folder)
    assert summary["base"] == meta["base"] and tokenizer.eos_token == "<eos>"
    ids = INPUTS["batch"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, student(ids).logits, rtol=0, atol=0)


def test_load_student_without_base_needs_the_model(tmp_path):
    folder, _ = make_student("llama", CirculantConfig(block_size=16), tmp_path)
    meta = json.loads((folder / "fitted.json").read_text())
    spec = meta.pop("base")["spec"]
    (folder / "fitted.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=f"{folder}.*does not record its base model.*model=") as err:
        load_student(folder)
    assert err.value.param == "model"
    _, _, summary = load_student(folder, model=spec)
    assert summary["base"]["kind"] == "folder" and summary["num_modules"] == 6


def test_base_record_kinds_and_gguf_check(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 5000)
    record = base_record(str(gguf))
    assert record == {"spec": str(gguf.resolve()), "kind": "gguf", "hf_revision": None,
                      "gguf_sha256": hashlib.sha256(gguf.read_bytes()).hexdigest()}
    assert base_record("nobody/not-cached") == {"spec": "nobody/not-cached", "kind": "hf",
                                                "gguf_sha256": None, "hf_revision": None}
    folder = tmp_path / "student"
    folder.mkdir()
    (folder / "fitted.json").write_text(json.dumps({"format": 1, "base": dict(record, gguf_sha256="0" * 64)}))
    with pytest.raises(InputError, match=f"{gguf.resolve()}.*sha256.*{folder}"):
        load_student(folder)


def test_export_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        export_student(tmp_path / "student", tmp_path / "out")


def test_cli_export_writes_the_folder_and_names_its_arguments(tmp_path, capsys):
    from bcllm.cli import main

    folder, student = make_student("llama", CirculantConfig(block_size=16), tmp_path)
    assert main(["export", str(folder), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "modeling_bcllm.py").is_file() and (tmp_path / "hf" / "model.bcllm.safetensors").is_file()
    assert "trust_remote_code=True" in capsys.readouterr().out
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["export", str(folder), str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_lm_eval_own_cli_runs_on_the_exported_folder(exported, tmp_path):
    """`python -m lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True` (lm-eval's
    own loader, no bcllm code) on the bundled offline task gives the accuracy bcllm's side-by-side
    run computes from the in-memory student."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install 'bcllm[lmeval]'")
    from bcllm.eval.lmeval import BUNDLED_TASKS_DIR, lm_eval_side_by_side

    students, dirs, _ = exported
    d = dirs["llama-circulant"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               HF_MODULES_CACHE=str(tmp_path / "modules"))
    run = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                          f"pretrained={d},trust_remote_code=True,dtype=float32", "--tasks", "bcllm_mc",
                          "--include_path", str(BUNDLED_TASKS_DIR), "--limit", "4", "--device", "cpu", "--batch_size", "1",
                          "--output_path", str(tmp_path / "out")], stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    result = json.loads(next((tmp_path / "out").rglob("results*.json")).read_text())
    acc = result["results"]["bcllm_mc"]["acc,none"]
    ours = lm_eval_side_by_side(students["llama-circulant"], students["llama-circulant"], tiny_tokenizer(),
                                "bcllm_mc", limit=4)["tasks"]["bcllm_mc"]["student"]["acc"]
    assert acc == pytest.approx(ours)
