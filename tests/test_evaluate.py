import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch
from conftest import tiny_model

from bcllm import CirculantConfig, compress_
from bcllm.eval import metrics as ev
from bcllm.cli import main
from bcllm.eval.metrics import TeacherCache, evaluate
from bcllm.io.prompts import load_prompts, tokenize_prompts
from bcllm.structures import BlockCirculantLinear


class CharTokenizer:
    """Enough of a tokenizer for the tiny random models (vocab 128): one token per character."""

    eos_token_id = None
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [3 + ord(c) % 120 for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + i % 26) for i in ids)


PROMPTS = ["hello world", "abc", "another prompt here", "xyz", "hello worle", "q"]


def build(model, tmp_path, prompts=PROMPTS, **kw):
    return TeacherCache.build(model, CharTokenizer(), prompts, root=tmp_path, progress=False, **kw)


# ---- metric functions against hand computations ----

Z = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5, 0.2],
                  [0.0, 3.0, 1.0, 0.0, 0.0, 0.1],
                  [1.0, 1.5, 2.5, 0.0, -2.0, 0.3],
                  [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])


def test_identical_logits():
    assert ev.top1_agreement(Z, Z).tolist() == [1.0] * 4
    assert ev.topk_overlap(Z, Z).tolist() == [1.0] * 4
    assert ev.kl_divergence(Z, Z).abs().max().item() == 0.0
    assert ev.logit_l2(Z, Z).tolist() == [0.0] * 4
    assert torch.allclose(ev.logit_cosine(Z, Z), torch.ones(4, dtype=torch.float64))


def test_top1_swap_gives_exact_fraction():
    s = Z.clone()
    for row in (1, 3):  # swap the first and second largest logits in two of four rows
        order = Z[row].argsort(descending=True)
        s[row, order[0]], s[row, order[1]] = Z[row, order[1]], Z[row, order[0]]
    assert ev.top1_agreement(Z, s).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert ev.top1_agreement(Z, s).mean().item() == 0.5
    assert ev.topk_overlap(Z, s).tolist() == [1.0] * 4  # the same five tokens, in another order


def test_top5_overlap_hand():
    t = torch.arange(10.0)[None]  # top5 = {9, 8, 7, 6, 5}
    s = torch.tensor([[9.0, 8, 7, 0, 0, 0, 0, 10, 11, 12]])  # top5 = {9, 8, 7, 0, 1}
    assert ev.topk_overlap(t, s).item() == pytest.approx(3 / 5)


def test_kl_l2_cosine_against_direct_formulas():
    s = Z.flip(-1) * 0.7
    for r in range(4):
        zt, zs = Z[r].tolist(), s[r].tolist()
        pt = [math.exp(v) / sum(math.exp(u) for u in zt) for v in zt]
        ps = [math.exp(v) / sum(math.exp(u) for u in zs) for v in zs]
        kl = sum(a * math.log(a / b) for a, b in zip(pt, ps))
        l2 = math.sqrt(sum((a - b) ** 2 for a, b in zip(zt, zs)))
        cos = sum(a * b for a, b in zip(zt, zs)) / math.sqrt(sum(a * a for a in zt) * sum(b * b for b in zs))
        assert ev.kl_divergence(Z[r:r + 1], s[r:r + 1]).item() == pytest.approx(kl, rel=1e-6)
        assert ev.logit_l2(Z[r:r + 1], s[r:r + 1]).item() == pytest.approx(l2, rel=1e-6)
        assert ev.logit_cosine(Z[r:r + 1], s[r:r + 1]).item() == pytest.approx(cos, rel=1e-6)


def test_perplexity_is_exp_of_hand_averaged_nll():
    ids = torch.tensor([1, 2, 0, 5])
    nll = [-math.log(math.exp(Z[p, ids[p + 1]].item()) / sum(math.exp(v) for v in Z[p].tolist()))
           for p in range(3)]  # position p predicts token p + 1; the last position predicts nothing
    stats = ev.prompt_stats(Z, Z, ids, [], [])
    assert stats["n_nll"] == 3
    assert stats["nll_t"] == pytest.approx(sum(nll), rel=1e-9)
    metrics, _, _ = ev.summarize([stats], max_new_tokens=0)
    assert metrics["ppl_teacher"] == pytest.approx(math.exp(sum(nll) / 3), rel=1e-9)
    assert metrics["generation_agreement"] is None


def test_generation_prefix():
    assert ev.common_prefix_length([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert ev.common_prefix_length([1, 2], [1, 2]) == 2
    assert ev.common_prefix_length([7], [1]) == 0
    a = ev.prompt_stats(Z, Z, torch.tensor([0, 1, 2, 3]), [1, 2, 3, 4], [1, 2, 9, 4])
    b = ev.prompt_stats(Z, Z, torch.tensor([0, 1, 2, 3]), [1, 2, 3, 4], [1, 2, 3, 4])
    metrics, _, per_prompt = ev.summarize([a, b], max_new_tokens=4)
    assert [p["generation_agreement"] for p in per_prompt] == [0.5, 1.0]
    assert metrics["generation_agreement"] == 0.75


def test_micro_average_over_positions():
    # Prompt A: 1 position, agrees. Prompt B: 3 positions, none agree. Micro = 1/4 (macro would be 1/2).
    t = torch.tensor([[1.0, 0.0]])
    b_t, b_s = torch.tensor([[1.0, 0.0]] * 3), torch.tensor([[0.0, 1.0]] * 3)
    a = ev.prompt_stats(t, t, torch.tensor([0]), [], [])
    b = ev.prompt_stats(b_t, b_s, torch.tensor([0, 0, 0]), [], [])
    metrics, ci, per_prompt = ev.summarize([a, b], max_new_tokens=0)
    assert metrics["token_agreement"] == 0.25
    assert metrics["last_token_agreement"] == 0.5
    kl_b = ev.kl_divergence(b_t[:1], b_s[:1]).item()
    assert metrics["kl_mean"] == pytest.approx(3 * kl_b / 4)
    assert metrics["kl_max"] == pytest.approx(kl_b)
    assert [p["token_agreement"] for p in per_prompt] == [1.0, 0.0]
    assert ci["token_agreement"][0] <= 0.25 <= ci["token_agreement"][1]


def test_bootstrap_ci():
    assert ev.bootstrap_ci([2, 2, 2], [4, 4, 4]) == [0.5, 0.5]
    num, den = np.arange(20.0), np.full(20, 20.0)
    lo, hi = ev.bootstrap_ci(num, den, seed=1)
    assert lo < num.sum() / den.sum() < hi
    assert ev.bootstrap_ci(num, den, seed=1) == [lo, hi]  # fixed seed: reproducible


# ---- batching and generation against independent references ----

def test_length_batches():
    ids = [[1] * n for n in (3, 5, 3, 3, 5, 1)]
    batches = ev.length_batches(ids, max_batch=2)
    assert sorted(i for b in batches for i in b) == list(range(6))
    flat = [len(ids[i]) for b in batches for i in b]
    assert flat == sorted(flat) and all(len(b) <= 2 for b in batches)
    assert all(len(b) * max(len(ids[i]) for i in b) <= 6 for b in ev.length_batches(ids, max_batch_tokens=6))


def naive_greedy(model, ids: list[int], n: int) -> list[int]:
    """Reference decoding: the whole sequence re-run for every token, no cache, no batch, no padding."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax().item())
    return seq[len(ids):]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_run_batch_matches_single_prompt_references(arch):
    model = tiny_model(arch)
    prompts = [[5, 9, 11, 40, 7], [6, 2, 90, 3, 3], [17, 4, 8]]  # two lengths: padding in the generation batch
    logits, new = ev.run_batch(model, prompts, 6)
    with torch.no_grad():
        for j, ids in enumerate(prompts):
            assert torch.allclose(logits[j], model(input_ids=torch.tensor([ids])).logits[0], atol=1e-5)
            assert new[j].tolist() == naive_greedy(model, ids, 6)


def test_greedy_end_token_is_sticky():
    model = tiny_model("llama")
    prompts = [[5, 9, 11], [7, 7, 7, 1]]
    free = ev.greedy_generate(model, prompts, 6)
    eos = free[0, 1].item()  # pretend the second generated token of prompt 0 ends the text
    stopped = ev.greedy_generate(model, prompts, 6, eos_ids=[eos])
    assert stopped[0].tolist() == free[0, :2].tolist() + [eos] * 4
    k = next((i + 1 for i, t in enumerate(free[1].tolist()) if t == eos), 6)
    assert stopped[1, :k].tolist() == free[1, :k].tolist() and set(stopped[1, k:].tolist()) <= {eos}


# ---- teacher cache and evaluate on tiny models ----

@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_student_equal_to_teacher(arch, tmp_path):
    model = tiny_model(arch)
    teacher = build(model, tmp_path, max_new_tokens=5)
    m = evaluate(copy.deepcopy(model), CharTokenizer(), PROMPTS, teacher=teacher, progress=False)["metrics"]
    assert m["token_agreement"] == 1.0 and m["last_token_agreement"] == 1.0 and m["top5_overlap"] == 1.0
    assert m["kl_mean"] < 1e-6 and m["kl_max"] < 1e-6
    assert m["generation_agreement"] == 1.0
    assert m["ppl_student"] == pytest.approx(m["ppl_teacher"], rel=1e-6)


def test_block_size_one_student_equals_teacher(tmp_path):
    model = tiny_model("llama")
    student = copy.deepcopy(model)
    compress_(student, CirculantConfig(block_size=1, targets="mlp"))
    m = evaluate(student, CharTokenizer(), PROMPTS, teacher=build(model, tmp_path), progress=False)["metrics"]
    assert m["token_agreement"] == 1.0 and m["kl_mean"] < 1e-6


def circulant_modules(model):
    return [m for m in model.modules() if isinstance(m, BlockCirculantLinear)]


def naive_generation(model, ids: list[int], n: int, eos_ids) -> list[int]:
    """naive_greedy, then every token after the first end token set to that end token."""
    new = naive_greedy(model, ids, n)
    stop = next((k + 1 for k, t in enumerate(new) if t in eos_ids), n)
    return new[:stop] + [new[stop - 1]] * (n - stop)


def test_evaluate_matches_unbatched_reference(tmp_path):
    """Every metric recomputed from plain one-prompt forwards and token-by-token generations, with
    the formulas written out; the student really is compressed, and generates through its
    compressed modules."""
    model = tiny_model("llama")
    student = copy.deepcopy(model)
    compress_(student, CirculantConfig(block_size=4, targets="mlp"))
    assert len(circulant_modules(student)) == 3 * 4 and not circulant_modules(model)
    decode_calls = []  # compressed products on one new position: the student's decode steps
    for module in circulant_modules(student):
        module.register_forward_pre_hook(lambda m, args: decode_calls.append(1) if args[0].shape[-2] == 1 else None)
    tok = CharTokenizer()
    teacher = build(model, tmp_path, max_new_tokens=4)
    result = evaluate(student, tok, PROMPTS, teacher=teacher, progress=False)
    assert decode_calls  # the generations ran the compressed modules
    agree = top5 = kl = l2 = cos = n = nll_t = nll_s = n_nll = 0.0
    last = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor(tok(prompt)["input_ids"])
            zt, zs = model(input_ids=ids[None]).logits[0].double(), student(input_ids=ids[None]).logits[0].double()
            pt, ps = zt.softmax(-1), zs.softmax(-1)
            a = (zt.argmax(-1) == zs.argmax(-1)).double()
            agree, n, last = agree + a.sum(), n + len(ids), last + [a[-1].item()]
            top5 += sum(len(set(zt[p].topk(5).indices.tolist()) & set(zs[p].topk(5).indices.tolist())) / 5
                        for p in range(len(ids)))
            kl += (pt * (pt.log() - ps.log())).sum()
            l2 += (zt - zs).pow(2).sum(-1).sqrt().sum()
            cos += ((zt * zs).sum(-1) / (zt.norm(dim=-1) * zs.norm(dim=-1))).sum()
            nll_t -= pt[:-1].log().gather(1, ids[1:, None]).sum()
            nll_s -= ps[:-1].log().gather(1, ids[1:, None]).sum()
            n_nll += len(ids) - 1
    m = result["metrics"]
    assert m["token_agreement"] == pytest.approx(float(agree / n))
    assert m["last_token_agreement"] == pytest.approx(sum(last) / len(last))
    assert m["top5_overlap"] == pytest.approx(float(top5 / n))
    assert m["kl_mean"] == pytest.approx(float(kl / n), rel=1e-3)
    assert m["logit_l2_mean"] == pytest.approx(float(l2 / n), rel=1e-4)
    assert m["logit_cosine_mean"] == pytest.approx(float(cos / n), rel=1e-6)
    assert m["ppl_teacher"] == pytest.approx(math.exp(nll_t / n_nll), rel=1e-5)
    assert m["ppl_student"] == pytest.approx(math.exp(nll_s / n_nll), rel=1e-5)
    assert set(ev.METRIC_KEYS) <= set(m)
    assert len(result["per_prompt"]) == len(PROMPTS) and result["per_prompt"][1]["prompt"] == "abc"
    # generations: each model alone, the whole sequence re-run for every token, the common prefix by hand
    eos_ids = ev.eos_token_ids(model, tok)
    prefixes = []
    for i, prompt in enumerate(PROMPTS):
        ids = tok(prompt)["input_ids"]
        gen_t, gen_s = naive_generation(model, ids, 4, eos_ids), naive_generation(student, ids, 4, eos_ids)
        assert teacher.generations[i] == gen_t
        row = result["per_prompt"][i]
        assert row["teacher_generation"] == tok.decode(gen_t) and row["student_generation"] == tok.decode(gen_s)
        prefixes.append(next((k for k in range(4) if gen_t[k] != gen_s[k]), 4))
        assert row["generation_agreement"] == prefixes[-1] / 4
    assert m["generation_agreement"] == pytest.approx(sum(prefixes) / (4 * len(PROMPTS)))
    # block size 4 is coarse enough to change what the student says: a compression that did
    # nothing (student == teacher) fails here
    assert min(prefixes) < 4 and m["generation_agreement"] < 1.0
    assert m["token_agreement"] < 1.0 and m["kl_mean"] > 1e-5


def test_cache_holds_teacher_logits_and_is_reused(tmp_path, monkeypatch):
    model = tiny_model("llama")
    teacher = build(model, tmp_path, max_new_tokens=3)
    assert teacher.computed
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([CharTokenizer()(PROMPTS[2])["input_ids"]])).logits[0]
    assert torch.allclose(teacher.logits(2), ref, atol=1e-5)
    assert np.load(teacher.path / "logits.npy", mmap_mode="r").dtype == np.float32

    def fail(*a, **k):
        raise AssertionError("the teacher ran again")

    monkeypatch.setattr(ev, "run_batch", fail)
    again = build(model, tmp_path, max_new_tokens=3)
    assert not again.computed and again.path == teacher.path and again.generations == teacher.generations
    monkeypatch.undo()
    # Another prompt set, setting or model gives another key.
    assert build(model, tmp_path, prompts=PROMPTS[:3], max_new_tokens=3).path != teacher.path
    assert build(model, tmp_path, max_new_tokens=4).path != teacher.path
    assert build(tiny_model("llama", seed=1), tmp_path, max_new_tokens=3).path != teacher.path


def test_interrupted_build_leaves_no_cache(tmp_path, monkeypatch):
    model = tiny_model("llama")
    real = ev.run_batch
    calls = []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ev, "run_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(model, tmp_path, max_batch=2)  # three batches: the second is interrupted
    assert list(tmp_path.iterdir()) == []  # neither a partial cache nor a temporary folder
    monkeypatch.undo()
    teacher = build(model, tmp_path)
    assert teacher.computed and len(teacher.generations) == len(PROMPTS)
    # A run killed outright (no cleanup) leaves a temporary folder; the next build removes it.
    killed = tmp_path / f".{teacher.path.name}.tmp4194303"
    killed.mkdir()
    import shutil
    shutil.rmtree(teacher.path)
    assert build(model, tmp_path).computed and not killed.exists()


def test_cache_key_ignores_thread_count(tmp_path):
    model = tiny_model("llama")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        first = build(model, tmp_path)
        torch.set_num_threads(2)
        assert not build(model, tmp_path).computed
    finally:
        torch.set_num_threads(threads)
    assert first.computed


def test_evaluate_refuses_other_prompts(tmp_path):
    model = tiny_model("llama")
    teacher = build(model, tmp_path)
    with pytest.raises(ValueError, match="other prompts"):
        evaluate(model, CharTokenizer(), PROMPTS[:2], teacher=teacher, progress=False)
    with pytest.raises(TypeError, match="TeacherCache"):
        evaluate(model, CharTokenizer(), PROMPTS, teacher=model, progress=False)


# ---- prompt files ----

def test_default_prompts():
    prompts = load_prompts()
    assert len(prompts) == 100 and all(p and p == p.strip() for p in prompts)


def test_prompt_file_blank_lines_ignored(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("first prompt\n\n   \n  second prompt  \r\nthird\n")
    assert load_prompts(f) == ["first prompt", "second prompt", "third"]


@pytest.mark.parametrize("content, message", [(b"", "no prompts"), (b"\n \n\n", "no prompts"),
                                              (b"abc\x00\x01\x02", "binary"), (b"caf\xe9\n", "not UTF-8")])
def test_bad_prompt_files(tmp_path, content, message):
    f = tmp_path / "p.txt"
    f.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_prompts(f)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="not a regular file"):
        load_prompts(tmp_path)


def test_truncation_warns():
    tok = CharTokenizer()
    with pytest.warns(UserWarning, match="1 prompt.*longer than 4 tokens.*prompt number\\(s\\) 2"):
        ids = tokenize_prompts(tok, ["abc", "abcdefg"], max_length=4)
    assert ids == [tok("abc")["input_ids"], tok("abcd")["input_ids"]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize_prompts(tok, ["abc"], max_length=4)


def test_prompts_longer_than_context_are_cut(tmp_path):
    model = tiny_model("gpt2")  # n_positions 128
    with pytest.warns(UserWarning, match="truncated"):
        teacher = build(model, tmp_path, prompts=["x" * 200, "short"], max_new_tokens=8)
    assert len(teacher.token_ids[0]) == 120


def test_chat_needs_template():
    with pytest.raises(ValueError, match="chat template"):
        tokenize_prompts(CharTokenizer(), ["hi"], chat=True)


# ---- CLI input errors: one line, exit 2, before any model is loaded ----

@pytest.mark.parametrize("make_args, message", [
    (lambda d: ["--prompts", str(d / "missing.txt")], "does not exist"),
    (lambda d: ["--prompts", str(d / "empty.txt")], "no prompts"),
    (lambda d: ["--prompts", str(d / "binary.txt")], "binary"),
    (lambda d: ["--json", str(d / "no_such_dir" / "out.json")], "does not exist"),
    (lambda d: ["--max-new-tokens", "-1"], "max-new-tokens"),
    (lambda d: ["--device", "nonsense"], "unknown --device"),
])
def test_cli_eval_input_errors(tmp_path, capsys, make_args, message):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)))
    assert main(["eval", *make_args(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def test_cli_unknown_option_value(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--fit", "nonsense"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


# ---- the real model ----

@pytest.mark.slow
def test_smollm2_student_equal_to_teacher(smollm2, tmp_path):
    model, tokenizer = smollm2
    prompts = load_prompts()[::20]
    teacher = TeacherCache.build(model, tokenizer, prompts, max_new_tokens=4, root=tmp_path, progress=False)
    for block_size in (None, 1):  # an untouched copy, and block size 1 (circulant = dense) in every MLP
        student = copy.deepcopy(model)
        if block_size:
            compress_(student, CirculantConfig(block_size=1, targets="mlp"))
        m = evaluate(student, tokenizer, prompts, teacher=teacher, progress=False)["metrics"]
        assert m["token_agreement"] == 1.0 and m["last_token_agreement"] == 1.0, block_size
        assert m["kl_mean"] < 1e-6 and m["kl_max"] < 1e-6, block_size
        assert m["generation_agreement"] == 1.0, block_size


@pytest.mark.slow
def test_cli_eval_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ev, "cache_dir", lambda: tmp_path)
    (tmp_path / "p.txt").write_text("Explain FFT.\nWhat is a circulant matrix?\n")
    out = tmp_path / "r.json"
    assert main(["eval", "--layers", "12", "--prompts", str(tmp_path / "p.txt"), "--max-new-tokens", "4",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"model", "config", "metrics", "compression", "per_prompt", "versions", "command"} <= set(data)
    assert set(ev.METRIC_KEYS) <= set(data["metrics"])
    assert {"replaced_params", "structured_params", "ratio"} <= set(data["compression"])
    assert data["compression"]["num_modules"] == 3 and len(data["per_prompt"]) == 2
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "token_agreement" in printed and "replaced 3 modules" in printed


@pytest.mark.slow
def test_cli_generate_side_by_side(capsys, monkeypatch):
    from bcllm.eval import student as student_module

    runs = []  # (model, prompt ids, new tokens, compressed products while it generated)
    real = student_module.greedy_generate

    def spy(model, token_ids, max_new_tokens, eos_ids=()):
        calls = []
        hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in circulant_modules(model)]
        try:
            new = real(model, token_ids, max_new_tokens, eos_ids)
        finally:
            for h in hooks:
                h.remove()
        runs.append((model, token_ids, new[0].tolist(), len(calls)))
        return new

    monkeypatch.setattr(student_module, "greedy_generate", spy)
    assert main(["generate", "--layers", "12", "--max-new-tokens", "6", "Explain FFT."]) == 0
    out = capsys.readouterr().out
    assert "teacher" in out and "student" in out and "replaced 3 modules" in out
    (teacher, ids, gen_t, _), (student, ids_s, gen_s, compressed_calls) = runs
    assert ids == ids_s and len(gen_t) == len(gen_s) == 6
    # the student is compressed (layer 12's three MLP projections) and generates through them; the teacher is not
    assert not circulant_modules(teacher) and len(circulant_modules(student)) == 3
    assert [n for n, m in student.named_modules() if isinstance(m, BlockCirculantLinear)] == \
        [f"model.layers.12.mlp.{p}_proj" for p in ("gate", "up", "down")]
    assert compressed_calls >= 3 * 6  # one forward per new token (the prompt's gives the first)
    with torch.no_grad():
        x = torch.tensor(ids)
        z_t, z_s = teacher(input_ids=x).logits, student(input_ids=x).logits
    assert (z_t - z_s).abs().max().item() > 1e-3  # the compression changes the logits
    agree = next((k for k in range(6) if gen_t[k] != gen_s[k]), 6)
    assert f"agree on the first {agree} of 6 tokens" in out
