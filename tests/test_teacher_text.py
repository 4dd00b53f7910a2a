"""Teacher-written calibration text, on-policy batches and the distillation divergences: each
checked against an independent reference (HF generate, a hand computation, the cached top-k loss)."""

import copy
import json
import math

import pytest
import torch

from bcllm import CirculantConfig, compress_
from conftest import tiny_model
from test_experiments import make_tiny_folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from bcllm.io.models import load_model

    model, tok = load_model(str(make_tiny_folder(tmp_path_factory.mktemp("tiny"))))
    return model.eval(), tok


def test_batched_left_padded_generation_equals_generate_row_by_row(tiny):
    """Rows of different lengths, left-padded in one batch with one static cache, give exactly the
    greedy tokens that HF generate gives each row alone (end tokens cut)."""
    from bcllm.fit.teacher_text import TeacherText, _Generator

    model, tok = tiny
    rows = [[5, 9, 13], [7, 3, 22, 40, 41, 8], [100, 2], [17, 18, 19, 20]]
    cfg = TeacherText(batch_size=6, max_new_tokens=7)  # 6 > 4 rows: the batch is filled and the extras dropped
    out = _Generator(model, cfg, 32, set(), 0)(rows, True, torch.Generator())
    assert len(out) == len(rows)
    for row, new in zip(rows, out):
        ref = model.generate(torch.tensor([row]), max_new_tokens=7, do_sample=False, pad_token_id=0)[0, len(row):]
        assert new == ref.tolist()


def test_sampling_keeps_to_the_nucleus():
    """top-p within top-k: a token outside the smallest set holding top_p of the mass is never drawn."""
    from bcllm.fit.teacher_text import TeacherText, _pick

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    cfg = TeacherText(temperature=1.0, top_p=0.7, top_k=4)
    drawn = _pick(logits, cfg, False, torch.Generator().manual_seed(0))[:, 0]
    assert set(drawn.tolist()) == {0, 1}  # 0.5 + 0.3 covers 0.7; 2 and 3 are outside
    share = (drawn == 0).float().mean().item()
    assert share == pytest.approx(0.5 / 0.8, abs=0.04)  # renormalised within the nucleus


def test_teacher_text_is_cached_resumes_and_keeps_follow_ups(tiny, tmp_path, monkeypatch):
    from bcllm.fit import teacher_text as tt

    monkeypatch.setenv("BCLLM_CACHE", str(tmp_path / "cache"))
    model, tok = tiny
    seeds = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9 ||| w10 w11", "w12"]
    cfg = tt.TeacherText(rounds=2, max_new_tokens=4, batch_size=2, greedy_share=0.5)
    first = tt.teacher_written(model, tok, cfg, seeds=seeds, progress=False)
    assert len(first["samples"]) == 2 * len(seeds)
    assert first["stats"]["replies"] == 2 * (len(seeds) + 1)  # the follow-up is one more reply a round
    multi = [s for s in first["samples"] if s.startswith("w6 w7 w8 w9")]
    assert multi and all("w10 w11" in s for s in multi)  # first turn, reply, follow-up, reply
    # an interrupted run: the cache file gone, a partial file holding some replies (one line torn)
    cache = next((tmp_path / "cache" / "calib").glob("teacher-*.json"))
    cache.unlink()
    partial = cache.with_suffix(".partial.jsonl")
    done = {f"0:{i}:0": "SENTINEL" for i in range(2)}
    partial.write_text(json.dumps(done) + "\n" + '{"torn')
    resumed = tt.teacher_written(model, tok, cfg, seeds=seeds, progress=False)
    assert sum("SENTINEL" in s for s in resumed["samples"]) == 2  # the replies on file were not redone
    assert not partial.exists()
    again = tt.teacher_written(model, tok, cfg, seeds=seeds, progress=False)
    assert again == resumed  # read from the cache


def test_bundled_seeds_are_many_varied_and_unlike_the_evaluation_prompts():
    from bcllm.fit.calib_text import overlapping
    from bcllm.fit.teacher_text import TURN, load_seeds
    from bcllm.io.prompts import HELDOUT_PROMPTS, load_prompts

    seeds = load_seeds()
    assert len(seeds) >= 2000 and len(set(seeds)) == len(seeds)
    assert sum(TURN in s for s in seeds) >= 100
    langs = ["Python", "Rust", "Go", "Java", "Kotlin", "Haskell", "Ruby", "Swift", "Lua", "C++", "TypeScript", "SQL"]
    assert all(any(lang in s for s in seeds) for lang in langs)
    prompts = load_prompts() + load_prompts(HELDOUT_PROMPTS)
    assert overlapping([s.replace(TURN, " ") for s in seeds], prompts) == []


def test_divergences_against_a_hand_computation():
    from bcllm.fit.distill import SKEW, divergence

    z_t = torch.tensor([[2.0, 0.5, -1.0]])
    z_s = torch.tensor([[0.0, 1.0, 0.3]])
    p = [math.exp(v) for v in z_t[0].tolist()]
    p = [v / sum(p) for v in p]
    q = [math.exp(v) for v in z_s[0].tolist()]
    q = [v / sum(q) for v in q]

    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b))
    m = [(x + y) / 2 for x, y in zip(p, q)]
    mix = [SKEW * x + (1 - SKEW) * y for x, y in zip(p, q)]
    assert divergence(z_t, z_s, "forward").item() == pytest.approx(kl(p, q), rel=1e-5)
    assert divergence(z_t, z_s, "reverse").item() == pytest.approx(kl(q, p), rel=1e-5)
    assert divergence(z_t, z_s, "jsd").item() == pytest.approx(0.5 * kl(p, m) + 0.5 * kl(q, m), rel=1e-5)
    assert divergence(z_t, z_s, "skew").item() == pytest.approx(kl(p, mix), rel=1e-5)


def _data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, (4, 16), generator=g), "attention_mask": torch.ones(4, 16, dtype=torch.long)}
            for _ in range(n)]


def test_full_forward_kl_equals_the_cached_top_k_loss_over_the_whole_vocabulary():
    """divergence="forward" on the teacher's full logits is the cached top-k + tail loss when k is
    the whole vocabulary: two ways to one number."""
    from bcllm.fit.distill import divergence, teacher_targets, topk_kl

    teacher = tiny_model("llama", layers=2)
    student = copy.deepcopy(teacher)
    compress_(student, CirculantConfig(block_size=8))
    batch = _data(1)[0]
    target = teacher_targets(teacher, [batch], 128)[0]["target"]
    with torch.no_grad():
        z_s = student(**batch).logits[batch["attention_mask"].bool()]
        z_t = teacher(**batch).logits[batch["attention_mask"].bool()]
    full = divergence(z_t, z_s, "forward").item()
    assert full > 1e-4  # a real gap, not two zeros
    # equal up to float32 rounding of the (empty) tail bucket
    assert topk_kl(z_s, target).item() == pytest.approx(full, rel=1e-3, abs=2e-6)


@pytest.mark.parametrize("kind", ["reverse", "jsd", "skew"])
def test_every_divergence_lowers_the_held_out_kl(kind):
    from bcllm.fit.distill import DistillConfig, distill_

    teacher = tiny_model("llama", layers=2)
    with torch.no_grad():
        for n, p in teacher.named_parameters():
            if ".mlp." in n:
                p.mul_(5)
    student = copy.deepcopy(teacher)
    compress_(student, CirculantConfig(block_size=8))
    r = distill_(student, teacher, _data(3), _data(1, 1), DistillConfig(steps=12, lr=3e-3, eval_every=12,
                                                                        divergence=kind), progress=False)
    assert r["held_out_kl"][-1][1] < r["held_out_kl"][0][1]


def test_on_policy_batches_are_the_students_own_continuations_of_the_prompts(tiny):
    from bcllm.fit.distill import DistillConfig, distill_
    from bcllm.fit.teacher_text import student_continuations

    teacher, tok = tiny
    student = copy.deepcopy(teacher)
    compress_(student, CirculantConfig(block_size=8))
    prompts = ["w1 w2 w3", "w9 w8"]
    source = student_continuations(student, tok, prompts, batch_size=2, max_length=16, new_tokens=5, pool=4)
    batch = source()
    assert batch["input_ids"].shape[0] == 2
    starts = {tuple(tok(p)["input_ids"]) for p in prompts}
    for row, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
        n = sum(mask)
        assert any(tuple(row[:len(s)]) == s for s in starts) and n <= max(map(len, starts)) + 5
    calls = []

    def counted():
        calls.append(1)
        return source()
    r = distill_(student, teacher, _data(2), _data(1, 1), DistillConfig(steps=8, eval_every=4, onpolicy=0.25),
                 progress=False, on_policy=counted, on_eval=lambda step: {"probe": step})
    assert len(calls) == 2  # a quarter of 8 steps
    assert [c["step"] for c in r["curve"]] == [0, 4, 8] and r["curve"][-1]["probe"] == 8
    assert r["distill_tokens"] > 0


def test_new_distillation_settings_are_checked():
    from bcllm.errors import InputError
    from bcllm.fit.distill import DistillConfig, distill_

    teacher = tiny_model("llama", layers=2)
    student = copy.deepcopy(teacher)
    compress_(student, CirculantConfig(block_size=8))
    with pytest.raises(InputError, match="divergence"):
        distill_(student, teacher, _data(1), (), DistillConfig(steps=1, divergence="kl2"), progress=False)
    with pytest.raises(InputError, match="share"):
        distill_(student, teacher, _data(1), (), DistillConfig(steps=1, onpolicy=1.5), progress=False)
    with pytest.raises(InputError, match="on-policy|onpolicy"):
        distill_(student, teacher, _data(1), (), DistillConfig(steps=1, onpolicy=0.5), progress=False)


@pytest.mark.slow
def test_the_bundled_teacher_text_is_the_default_models_own(smollm2, tmp_path, monkeypatch):
    """On a fresh machine (empty cache) the default model's teacher text comes from the bundled
    file, found by its cache key (model fingerprint, settings, seeds): nothing is generated."""
    from bcllm.fit import teacher_text as tt

    monkeypatch.setenv("BCLLM_CACHE", str(tmp_path / "cache"))
    model, tok = smollm2
    monkeypatch.setattr(tt, "_Generator", None)  # generating would fail
    result = tt.teacher_written(model, tok, model_id="smollm2-135m", progress=False)
    assert result["stats"]["seeds"] == len(tt.load_seeds()) and len(result["samples"]) == len(tt.load_seeds())
    assert result["stats"]["config"] == __import__("dataclasses").asdict(tt.TeacherText())


def test_on_policy_share_is_exact_for_any_share():
    from bcllm.fit.distill import on_policy_step

    for share in (0.1, 0.25, 0.3, 0.4, 0.7, 0.9):
        assert sum(on_policy_step(i, share) for i in range(100)) == math.floor(100 * share + 1e-9)
    assert not any(on_policy_step(i, 0.0) for i in range(50))


def test_a_torn_partial_line_is_cut_before_appending(tmp_path):
    from bcllm.fit.teacher_text import _end_torn_line, _read_partial

    path = tmp_path / "p.jsonl"
    path.write_text('{"0:1:0": "a"}\n{"0:2:0": "b')
    _end_torn_line(path)
    with open(path, "a") as f:
        f.write('{"0:3:0": "c"}\n')
    assert _read_partial(path) == {"0:1:0": "a", "0:3:0": "c"}


def test_end_tokens_never_include_the_unknown_token(tiny):
    from bcllm.fit.teacher_text import end_tokens

    model, tok = tiny
    ends = end_tokens(model, tok)
    assert tok.eos_token_id in ends and tok.unk_token_id not in ends
    assert ends == {tok.eos_token_id, model.generation_config.eos_token_id} - {None}
