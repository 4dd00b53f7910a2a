"""lm-evaluation-harness side by side, offline: the bundled tasks on a tiny random Llama, every
figure checked against a computation from the model's own logits (no lm-eval code involved)."""

import copy
import json
import math
import os
import re
import socket

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from conftest import tiny_model

pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install 'bcllm[lmeval]'")

from bcllm import CirculantConfig, compress_  # noqa: E402
from bcllm.cli import main  # noqa: E402
from bcllm.errors import InputError  # noqa: E402
from bcllm.eval.lmeval import (BUNDLED_TASKS, BUNDLED_TASKS_DIR, bundled_task_texts, format_table,  # noqa: E402
                          lm_eval_side_by_side, require_lm_eval)

LIMIT = 4


def char_tokenizer():
    """One token per printable ASCII character (ids 2..96 of the tiny models' 128), no BOS: the
    bundled English text tokenizes without unknowns, and by hand."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{chr(c): c - 30 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def docs(task: str) -> list[dict]:
    return [json.loads(line) for line in (BUNDLED_TASKS_DIR / BUNDLED_TASKS[task]).read_text().splitlines()]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: offline means offline."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def models():
    teacher = tiny_model("llama", layers=2)
    student = copy.deepcopy(teacher)
    compress_(student, CirculantConfig(block_size=8, targets="mlp"))
    return teacher, student


@pytest.fixture(scope="module")
def side_by_side(models):
    teacher, student = models
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", lambda *a: pytest.fail(f"network access attempted: {a}"))
        return lm_eval_side_by_side(teacher, student, char_tokenizer(), "bcllm_ppl,bcllm_mc", limit=LIMIT)


# ---- the same figures from the model's logits

@torch.no_grad()
def continuation_loglikelihood(model, context: list[int], continuation: list[int]) -> float:
    """sum of log p(continuation token | everything before it), one forward pass, float64 log-softmax."""
    ids = torch.tensor([context + continuation])
    logprobs = torch.log_softmax(model(ids).logits[0].double(), -1)
    return sum(logprobs[len(context) + i - 1, t].item() for i, t in enumerate(continuation))


def encode(text: str) -> list[int]:
    return char_tokenizer()(text, add_special_tokens=False)["input_ids"]


def rolling_loglikelihood(model, text: str) -> float:
    """A whole document after the end-of-text token (the tokenizer has no BOS); it fits one window."""
    return continuation_loglikelihood(model, [char_tokenizer().eos_token_id], encode(text))


def choice_loglikelihoods(model, doc: dict) -> list[float]:
    context = f"Question: {doc['question']}\nAnswer:"
    return [continuation_loglikelihood(model, encode(context), encode(" " + c)) for c in doc["choices"]]


def argmax(values) -> int:
    return max(range(len(values)), key=values.__getitem__)


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_perplexity_task_equals_log_softmax_sums(side_by_side, models, role):
    model = dict(zip(("teacher", "student"), models))[role]
    texts = [d["text"] for d in docs("bcllm_ppl")[:LIMIT]]
    hand = [rolling_loglikelihood(model, t) for t in texts]
    entry = side_by_side["tasks"]["bcllm_ppl"]
    assert entry["per_doc"][role] == pytest.approx(hand, rel=1e-4)
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    metrics = entry[role]
    assert metrics["word_perplexity"] == pytest.approx(math.exp(-sum(hand) / words), rel=1e-3)
    assert metrics["byte_perplexity"] == pytest.approx(math.exp(-sum(hand) / n_bytes), rel=1e-4)
    assert metrics["bits_per_byte"] == pytest.approx(-sum(hand) / n_bytes / math.log(2), rel=1e-4)
    assert entry["samples"] == {"original": 30, "effective": LIMIT}


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_multiple_choice_accuracy_equals_argmax_of_loglikelihoods(side_by_side, models, role):
    model = dict(zip(("teacher", "student"), models))[role]
    items = docs("bcllm_mc")[:LIMIT]
    hand = [choice_loglikelihoods(model, d) for d in items]
    entry = side_by_side["tasks"]["bcllm_mc"]
    for got, expected in zip(entry["per_doc"][role], hand):
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-4)
    acc = sum(argmax(lls) == d["answer"] for lls, d in zip(hand, items)) / LIMIT
    acc_norm = sum(argmax([ll / len(c) for ll, c in zip(lls, d["choices"])]) == d["answer"]
                   for lls, d in zip(hand, items)) / LIMIT
    assert entry[role]["acc"] == acc and entry[role]["acc_norm"] == acc_norm
    assert 0 < entry[f"{role}_stderr"]["acc"] or acc in (0.0, 1.0)


def test_the_student_differs_and_the_table_shows_both(side_by_side):
    ppl = side_by_side["tasks"]["bcllm_ppl"]
    assert ppl["teacher"]["byte_perplexity"] != ppl["student"]["byte_perplexity"]
    table = format_table(side_by_side)
    for text in ("bcllm_ppl", "bcllm_mc", "word_perplexity", "acc_norm", "same_choice", "student-teacher"):
        assert text in table
    assert side_by_side["lm_eval_version"] == "0.4.13"


def test_a_model_against_itself_gives_identical_tables(models, no_network):
    teacher = models[0]
    result = lm_eval_side_by_side(teacher, copy.deepcopy(teacher), char_tokenizer(), ["bcllm_mc", "bcllm_ppl"], limit=3)
    for entry in result["tasks"].values():
        assert entry["teacher"] == entry["student"] and entry["per_doc"]["teacher"] == entry["per_doc"]["student"]
    assert result["tasks"]["bcllm_mc"]["same_choice"] == 1.0


# ---- bundled task files

def test_bundled_tasks_are_well_formed():
    paragraphs, items = docs("bcllm_ppl"), docs("bcllm_mc")
    assert len(paragraphs) == 30 and all(len(d["text"].split()) >= 40 for d in paragraphs)
    assert len(items) == 48 and len({d["question"] for d in items}) == 48
    assert all(len(set(d["choices"])) == 4 and 0 <= d["answer"] < 4 for d in items)
    assert [sum(d["answer"] == k for d in items) for k in range(4)] == [12] * 4  # chance is 0.25
    assert all(t.isascii() for t in bundled_task_texts(list(BUNDLED_TASKS)))
    assert bundled_task_texts(["bcllm_mc"])[0] == "Question: What is 2 + 3? Answer: 5"


# ---- command line

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-lmeval")
    tiny_model("llama", layers=2).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def test_cli_writes_table_and_json(tiny_folder, tmp_path, capsys, no_network):
    out = tmp_path / "lm.json"
    argv = ["lm-eval", "--model", str(tiny_folder), "--tasks", "bcllm_mc,bcllm_ppl", "--limit", "2",
            "--layers", "all", "--block-size", "8", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "bcllm_mc 2 of 48 documents (0-shot)" in printed and "same_choice" in printed
    record = json.loads(out.read_text())
    assert set(record) == {"model", "config", "lm_eval", "compression", "timing", "versions", "command"}
    assert record["versions"]["lm_eval"] == "0.4.13" and record["config"]["tasks"] == "bcllm_mc,bcllm_ppl"
    assert record["compression"]["num_modules"] == 6
    assert set(record["lm_eval"]["tasks"]) == {"bcllm_mc", "bcllm_ppl"}


def test_cli_runs_a_users_task_folder_and_refuses_a_dataset_that_is_not_there(tiny_folder, tmp_path, capsys,
                                                                              no_network):
    """A task of the user's own (lm-eval's `dataset_path: json` with an absolute path: the bundled
    questions again) runs offline beside a bundled one; a task whose dataset is on the Hub only is
    refused before the model loads."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    mc = (BUNDLED_TASKS_DIR / "bcllm_mc.yaml").read_text().split("output_type:", 1)[1]
    data = BUNDLED_TASKS_DIR / BUNDLED_TASKS["bcllm_mc"]
    (folder / "my_mc.yaml").write_text(f"task: my_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                       f"    test: {data}\noutput_type:{mc}")
    (folder / "hub_only.yaml").write_text("task: hub_only\ndataset_path: bcllm-test/no-such-dataset\n"
                                          "output_type: loglikelihood_rolling\ntest_split: test\ndoc_to_target: x\n")
    out = tmp_path / "mine.json"
    base = ["lm-eval", "--model", str(tiny_folder), "--layers", "0", "--include-path", str(folder), "--limit", "3"]
    assert main([*base, "--tasks", "my_mc,bcllm_mc", "--json", str(out)]) == 0
    tasks = json.loads(out.read_text())["lm_eval"]["tasks"]
    assert tasks["my_mc"]["teacher"] == tasks["bcllm_mc"]["teacher"]
    assert tasks["my_mc"]["per_doc"] == tasks["bcllm_mc"]["per_doc"]
    capsys.readouterr()
    assert main([*base, "--tasks", "hub_only"]) == 2
    assert "--tasks: the dataset of 'hub_only' is not available offline" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "bcllm_nope"], "--tasks: unknown lm-eval task 'bcllm_nope' (close: bcllm_mc, bcllm_ppl)"),
    (["--tasks", " , "], "--tasks: give at least one task name"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--include-path", "/no/such/folder"], "--include-path '/no/such/folder' is not a folder"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tiny_folder, capsys, argv, message, no_network):
    assert main(["lm-eval", "--model", str(tiny_folder), *argv]) == 2
    assert message in capsys.readouterr().err


def test_missing_lm_eval_says_how_to_install(monkeypatch, tiny_folder, capsys):
    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(InputError, match=re.escape("lm-eval is not installed: pip install 'bcllm[lmeval]'")):
        require_lm_eval()
    assert main(["lm-eval", "--model", str(tiny_folder)]) == 2
    assert "bcllm[lmeval]" in capsys.readouterr().err
