"""Recovery: block reconstruction against its closed-form start and a live-model reference, the
distillation prefix cache against the plain forward, the floor against zeroed weights, and the
default calibration on a model without a chat template."""

import copy
import math

import pytest
import torch

from bcllm import CirculantConfig, LowRankConfig, compress_
from bcllm.fit.closed_form import fit_sequential_
from bcllm.fit.reconstruct import BlockConfig, reconstruct_
from conftest import tiny_model


def sharp_teacher(layers=4):
    """A tiny Llama whose MLPs matter (random init leaves them small): a real gap to close."""
    teacher = tiny_model("llama", layers=layers)
    with torch.no_grad():
        for n, p in teacher.named_parameters():
            if ".mlp." in n:
                p.mul_(5)
    return teacher


def batches(n=6, seed=0, length=24):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 128, (4, length), generator=g)
        mask = torch.ones_like(ids)
        mask[3, length // 2:] = 0  # padding never counts
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def students(teacher, config):
    a, b = copy.deepcopy(teacher), copy.deepcopy(teacher)
    compress_(a, config)
    compress_(b, config)
    return a, b


@pytest.mark.parametrize("config", [CirculantConfig(block_size=8, layers="1-2"),
                                    LowRankConfig(budget_block_size=8, layers="1-2")], ids=["circulant", "lowrank"])
@pytest.mark.parametrize("target", ["mlp", "layer"])
def test_block_reconstruction_starts_at_the_closed_form_and_lowers_held_out_error(config, target):
    teacher = sharp_teacher()
    data = batches(n=12, length=32)
    closed, trained = students(teacher, config)
    fit_sequential_(closed, teacher, data, progress=False)
    start = copy.deepcopy(trained)
    info = reconstruct_(start, teacher, data, BlockConfig(epochs=0, target=target), progress=False)
    for (n, a), (_, b) in zip(start.named_parameters(), closed.named_parameters()):  # epochs=0: the closed form
        assert torch.equal(a, b), n
    assert all(r["held_after"] == r["held_before"] for r in info["layers"])
    info = reconstruct_(trained, teacher, data, BlockConfig(epochs=10, lr=1e-3, batch_tokens=64, target=target),
                        progress=False)
    assert [r["layer"] for r in info["layers"]] == [1, 2]
    for r in info["layers"]:
        assert r["held_after"] < r["held_before"], r  # held-out batches never trained on
        assert r["train_after"] < r["train_before"], r


def test_cached_activation_training_equals_training_through_the_live_model():
    """target="layer": the cached student inputs of a layer give the same updates as running the
    whole live student (embeddings, earlier layers) and the teacher at every step."""
    from bcllm.fit.reconstruct import _schedule_factor

    teacher = sharp_teacher(layers=3)
    data = batches(n=4)
    config = CirculantConfig(block_size=8, layers="1")
    cached, live = students(teacher, config)
    cfg = BlockConfig(epochs=2, lr=3e-3, target="layer", held_out=0.25)
    info = reconstruct_(cached, teacher, data, cfg, progress=False)
    assert info["layers"][0]["epochs_run"] == 2  # both epochs improved: the last state is kept

    fit_sequential_(live, teacher, data, progress=False)
    layer = live.model.layers[1]
    params = [p for n, p in layer.mlp.named_parameters() if not n.endswith("bias")]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    train = data[:3]
    total = cfg.epochs * len(train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule_factor(s, total))
    g = torch.Generator().manual_seed(cfg.seed * 7919 + 1)

    def output(model, batch):
        seen = {}
        handle = model.model.layers[1].register_forward_hook(
            lambda m, a, out: seen.setdefault("y", out[0] if isinstance(out, tuple) else out))
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        handle.remove()
        return seen["y"]

    for _ in range(cfg.epochs):
        for i in torch.randperm(len(train), generator=g).tolist():
            with torch.no_grad():
                y = output(teacher, train[i])
            w = train[i]["attention_mask"] / y.pow(2).mean(-1)
            out = output(live, train[i])
            loss = (w[..., None] * (out - y) ** 2).sum() / (w[..., None] * y ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    for (n, a), (_, b) in zip(cached.named_parameters(), live.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), n


@pytest.mark.parametrize("hidden_mse", [0.0, 0.5])
def test_distillation_with_a_cached_prefix_equals_the_full_forward(hidden_mse):
    from bcllm.fit.distill import DistillConfig, distill_

    teacher = sharp_teacher(layers=4)
    data = batches(n=3)
    plain, cached = students(teacher, CirculantConfig(block_size=8, layers="2-3"))
    runs = []
    for student, cache in ((plain, False), (cached, True)):
        # hidden_mse: the student's hidden states then miss the skipped layers (transformers records
        # decoder layers' outputs only), so the terms must be matched by layer, not by position
        cfg = DistillConfig(steps=6, lr=3e-3, topk=16, eval_every=3, cache_prefix=cache, hidden_mse=hidden_mse)
        runs.append(distill_(student, teacher, data[:2], data[2:], cfg, progress=False))
    assert runs[0]["prefix_layers_cached"] == 0 and runs[1]["prefix_layers_cached"] == 2
    assert runs[0]["loss"] == pytest.approx(runs[1]["loss"], rel=1e-4)
    assert runs[0]["held_out_kl"][-1][1] == pytest.approx(runs[1]["held_out_kl"][-1][1], rel=1e-4)
    for (n, a), (_, b) in zip(plain.named_parameters(), cached.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), n
    assert isinstance(cached.model.layers[0], type(teacher.model.layers[0]))  # the prefix layers are back


def test_floor_equals_zeroed_weights_and_kl_recovered_by_hand(tmp_path, monkeypatch):
    from bcllm.eval.metrics import TeacherCache, evaluate, measure_floor, with_floor
    from test_experiments import make_tiny_folder
    from bcllm.io.models import load_model

    monkeypatch.setenv("BCLLM_CACHE", str(tmp_path / "cache"))
    folder = make_tiny_folder(tmp_path / "tiny")
    model, tok = load_model(str(folder))
    prompts = (folder / "prompts.txt").read_text().splitlines()
    teacher = TeacherCache.build(model, tok, prompts, max_new_tokens=2)
    modules = [f"model.layers.{i}.mlp.down_proj" for i in (1, 2)]
    floor = measure_floor(model, modules, tok, prompts, teacher)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for name in modules:
            zeroed.get_submodule(name).weight.zero_()  # no bias: a zero weight outputs zero
    ref = evaluate(zeroed, tok, prompts, teacher, progress=False)["metrics"]
    assert floor["floor_token_agreement"] == pytest.approx(ref["token_agreement"])
    assert floor["floor_kl_mean"] == pytest.approx(ref["kl_mean"], rel=1e-6) and floor["floor_kl_mean"] > 0
    m = with_floor({"kl_mean": 0.25 * floor["floor_kl_mean"], "token_agreement": 0.5}, floor)
    assert m["kl_recovered"] == pytest.approx(0.75)


def test_default_calibration_works_without_a_chat_template(tmp_path, monkeypatch):
    """The default source on a base model: self-seed text instead of self-chat, plus pydoc."""
    from bcllm.fit.calib_text import MIX_SELF, load_calibration, pydoc_chunks
    from bcllm.io.models import load_model
    from bcllm.fit.student import StudentSpec
    from test_experiments import make_tiny_folder

    monkeypatch.setenv("BCLLM_CACHE", str(tmp_path / "cache"))
    model, tok = load_model(str(make_tiny_folder(tmp_path / "tiny")))
    assert not getattr(tok, "chat_template", None)
    samples = load_calibration("mix", model, tok, 40, 4, 0, "tiny")
    corpus = set(pydoc_chunks())
    own = [s for s in samples if s not in corpus]
    assert len(samples) == 40 and len(own) == min(MIX_SELF, 40 // 4)
    assert all(s.split()[0] in {"The", "In", "A", "Once", "When", "It", "My", "Today", "There", "How", "One",
                                "Scientists", "If", "This", "We", "Many", "According", "After"} for s in own)
    assert math.isclose(len(samples) - len(own), 30)


def test_distillation_over_the_teachers_vocabulary():
    """vocab="teacher": with every token in the teacher's top-k it is the full loss exactly; with a
    small top-k it still lowers the full-vocabulary held-out KL."""
    from bcllm.fit.distill import DistillConfig, distill_

    teacher = sharp_teacher(layers=2)
    data = batches(n=4)
    runs = {}
    for vocab, topk in (("full", 128), ("teacher", 128), ("teacher", 8)):
        student = copy.deepcopy(teacher)
        compress_(student, CirculantConfig(block_size=8))
        cfg = DistillConfig(steps=8, lr=3e-3, topk=topk, eval_every=8, vocab=vocab)
        runs[vocab, topk] = distill_(student, teacher, data[:3], data[3:], cfg, progress=False)
        assert isinstance(student.lm_head, torch.nn.Linear)  # the full output layer is back
    assert runs["teacher", 128]["vocab_size"] == 128
    assert runs["teacher", 128]["loss"] == pytest.approx(runs["full", 128]["loss"], rel=1e-4)
    small = runs["teacher", 8]
    assert small["held_out_kl"][-1][1] < small["held_out_kl"][0][1]


def test_batch_vocabulary_targets_against_a_hand_computation():
    """vocab="teacher": each batch's vocabulary is the union of its own positions' top-k tokens, and
    the target's log-sum-exp is the teacher's over that vocabulary alone."""
    from bcllm.fit.distill import _masked, teacher_targets, topk_kl_rows

    teacher = sharp_teacher(layers=2)
    data = batches(n=2)
    for batch, t in zip(data, teacher_targets(teacher, data, 4, restrict=True)):
        with torch.no_grad():
            z = teacher(**batch).logits[_masked(batch)].double()
        top = z.topk(4, dim=-1).indices
        vocab = sorted({int(i) for i in top.reshape(-1)})
        assert t["vocab"].tolist() == vocab and len(vocab) < z.shape[-1]
        values, ids, lse = t["target"]
        assert [[vocab[k] for k in row] for row in ids.tolist()] == top.tolist()
        assert torch.allclose(lse.double(), torch.logsumexp(z[:, vocab], -1), atol=1e-5)
        # the loss on the batch's vocabulary: KL of the teacher's and student's distributions restricted to
        # it, top-k plus one tail bucket, computed here from the softmax over the vocabulary alone
        z_s = torch.randn(z.shape[0], len(vocab), dtype=torch.float64)
        p_t = torch.softmax(z[:, vocab], -1)
        q_s = torch.softmax(z_s, -1)
        hand = []
        for r in range(z.shape[0]):
            kept = [vocab.index(int(i)) for i in top[r]]
            tail_p, tail_q = 1 - p_t[r, kept].sum(), 1 - q_s[r, kept].sum()
            hand.append((p_t[r, kept] * (p_t[r, kept] / q_s[r, kept]).log()).sum() + tail_p * (tail_p / tail_q).log())
        assert torch.allclose(topk_kl_rows(z_s, t["target"]).double(), torch.stack(hand), atol=1e-4)


def test_block_settings_are_checked_where_they_are_made():
    """BlockConfig checks itself, so every path that builds one (pipeline, streaming) refuses bad settings."""
    from bcllm.errors import InputError
    from bcllm.fit.student import StudentSpec, block_config

    with pytest.raises(InputError, match="lr > 0"):
        BlockConfig(lr=0)
    with pytest.raises(InputError, match="unknown block target"):
        BlockConfig(target="attention")
    with pytest.raises(InputError, match="lr > 0"):
        block_config(StudentSpec(fit="block", block_lr=0.0))


def test_the_default_vocabulary_is_the_teachers_where_it_applies():
    from bcllm.fit.student import StudentSpec

    assert StudentSpec().vocab == "teacher" and StudentSpec(fit="block").point()["distill_vocab"] == "teacher"
    assert StudentSpec().point()["distill_vocab"] == "full"  # no distillation: the setting cannot matter
    assert StudentSpec(distill_onpolicy=0.25).vocab == "full"
    assert StudentSpec(distill_divergence="reverse").vocab == "full"
    assert StudentSpec(distill_vocab="full").vocab == "full"
    with pytest.raises(Exception, match="allowed: auto, full, teacher"):
        StudentSpec(distill_vocab="most")


def test_bf16_without_hardware_support_warns(monkeypatch):
    from bcllm.fit import distill
    from bcllm.fit.distill import DistillConfig, distill_

    monkeypatch.setattr(distill, "cpu_has_bf16", lambda: False)
    teacher = sharp_teacher(layers=2)
    student = copy.deepcopy(teacher)
    compress_(student, CirculantConfig(block_size=8))
    with pytest.warns(RuntimeWarning, match="without bfloat16 instructions"):
        distill_(student, teacher, batches(n=2), (), DistillConfig(steps=1, bf16=True), progress=False)


def test_cpu_bf16_check_reads_the_hardware_flags_not_emulation():
    """AVX-512 alone (oneDNN emulates bf16 there) is no bf16 hardware; avx512_bf16 or amx_bf16 is."""
    from bcllm.fit.distill import cpu_has_bf16

    base = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512vl\n"
    assert not cpu_has_bf16(base)
    assert cpu_has_bf16(base.replace("avx512vl", "avx512vl avx512_bf16"))
    assert cpu_has_bf16(base.replace("avx512vl", "amx_tile amx_bf16"))
    assert not cpu_has_bf16("processor\t: 0\n")  # no flags line
