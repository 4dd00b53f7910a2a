"""Calibration: closed-form fits against independent least-squares references, the fit drivers,
calibration data, checkpoints and distillation on tiny random models."""

import copy
import dataclasses
import json
import itertools

import pytest
import torch
from bcllm.ops import circulant
from bcllm.fit.closed_form import InputStats, fit_aware_, fit_sequential_, fitted_modules
from bcllm.structures import BlockCirculantLinear
from bcllm import CirculantConfig, compress_
from conftest import tiny_model


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def basis(out_f, in_f, b):
    """Explicit block-circulant basis, one (out, in) 0/1 matrix per parameter c[i, j, k], entry by entry."""
    p, q = circulant.grid_shape(out_f, in_f, b)
    mats = []
    for i, j, k in itertools.product(range(p), range(q), range(b)):
        m = torch.zeros(out_f, in_f, dtype=torch.float64)
        for r, s in itertools.product(range(out_f), range(in_f)):
            if r // b == i and s // b == j and (r % b - s % b) % b == k:
                m[r, s] = 1.0
        mats.append(m)
    return torch.stack(mats)  # (p*q*b, out, in)


def dense_lstsq(weight, x_s, x_t, b):
    """min_c sum_n ||C(c) x_s,n - W x_t,n||^2 as one real least-squares problem over explicit features."""
    out_f, in_f = weight.shape
    B = basis(out_f, in_f, b)
    features = torch.einsum("kri,ni->nrk", B, x_s).reshape(-1, B.shape[0])   # (N*out, P)
    target = (x_t @ weight.T).reshape(-1)
    c = torch.linalg.lstsq(features, target[:, None], driver="gelsd").solution[:, 0]
    return torch.einsum("k,kri->ri", c, B)


def stats_of(x_s, x_t):
    return InputStats(x_s.T @ x_s, x_s.T @ x_t, x_s.shape[0])


@pytest.mark.parametrize("out_f,in_f,b", [(8, 8, 4), (12, 8, 4), (8, 12, 2), (10, 13, 4), (7, 9, 3), (6, 6, 1),
                                          (16, 8, 8), (9, 12, 4)])
@pytest.mark.parametrize("sequential", [False, True])
def test_aware_fit_matches_dense_least_squares(out_f, in_f, b, sequential):
    g = torch.Generator().manual_seed(out_f * 100 + in_f * 10 + b)
    n = 200
    # correlated inputs (so the fit differs from the Frobenius projection)
    mix = torch.randn(in_f, in_f, generator=g, dtype=torch.float64)
    x_t = torch.randn(n, in_f, generator=g, dtype=torch.float64) @ mix
    x_s = x_t + 0.3 * torch.randn(n, in_f, generator=g, dtype=torch.float64) if sequential else x_t
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    st = stats_of(x_s, x_t)
    c = circulant.fit_aware(w, st.xx, st.xt, b, ridge=0.0)
    fitted = circulant.to_dense(c, out_f, in_f)
    ref = dense_lstsq(w, x_s, x_t, b)
    assert rel_err(fitted, ref) < 1e-5
    # and it really is better on the data than the Frobenius projection
    frob = circulant.to_dense(circulant.project_frobenius(w, b), out_f, in_f)
    assert ((x_s @ fitted.T - x_t @ w.T).norm() <= (x_s @ frob.T - x_t @ w.T).norm() + 1e-9)


def test_block_size_one_recovers_weight():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(7, 12, generator=g, dtype=torch.float64)
    x = torch.randn(100, 12, generator=g, dtype=torch.float64)
    st = stats_of(x, x)
    c = circulant.fit_aware(w, st.xx, st.xt, 1, ridge=0.0)
    assert rel_err(circulant.to_dense(c, 7, 12), w) < 1e-10


def test_ridge_shrinks_towards_zero_and_matches_closed_form():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 8, generator=g, dtype=torch.float64)
    x = torch.randn(50, 8, generator=g, dtype=torch.float64)
    st = stats_of(x, x)
    norms = [circulant.fit_aware(w, st.xx, st.xt, 4, ridge=r).norm().item() for r in (0.0, 0.1, 10.0, 1e6)]
    assert norms[0] > norms[1] > norms[2] > norms[3] and norms[3] < 1e-3 * norms[0]
    # block size 1: ridge solution is (xx + lam I)^-1 xx W^T with lam = ridge * mean(diag xx)
    lam = 0.1 * st.xx.diagonal().mean()
    ref = torch.linalg.solve(st.xx + lam * torch.eye(8, dtype=torch.float64), st.xx @ w.T).T
    assert rel_err(circulant.to_dense(circulant.fit_aware(w, st.xx, st.xt, 1, ridge=0.1), 8, 8), ref) < 1e-10


def test_fit_aware_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        circulant.fit_aware(torch.randn(4, 8), torch.eye(4), torch.eye(4), 2)


def test_module_fit_uses_stats():
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(12, 8)
    x = torch.randn(300, 12, generator=g) @ torch.randn(12, 12, generator=g)
    layer = BlockCirculantLinear.from_linear(lin, 4)
    before = (layer(x) - lin(x)).norm()
    st = InputStats.zeros(12)
    st.add_(x[:150])
    st.add_(x[150:])
    assert st.n == 300 and st.xt is st.xx
    layer.fit_(lin.weight, st, ridge=0.0)
    after = (layer(x) - lin(x)).detach().norm()
    assert after < before
    ref = dense_lstsq(lin.weight.detach().double(), x.double(), x.double(), 4)
    assert rel_err(layer.to_dense().double(), ref) < 1e-4


def tiny_batches(vocab=128, seed=0, n=3, pad=True):
    """Right-padded batches with attention masks (padding must not enter the statistics)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (2, 12), generator=g)
        mask = torch.ones_like(ids)
        if pad:
            mask[1, 8:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def raw_inputs(model, names, batches):
    """Explicit input rows of each named module over all real positions (reference path)."""
    rows = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: rows[n].append(a[0].detach())) for n in names]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    masks = torch.cat([b["attention_mask"].reshape(-1) for b in batches]).bool()
    return {n: torch.cat([r.reshape(-1, r.shape[-1]) for r in v])[masks].double() for n, v in rows.items()}


def compressed_pair(arch="llama", layers="1-2", targets="mlp", b=8):
    teacher = tiny_model(arch)
    student = copy.deepcopy(teacher)
    compress_(student, CirculantConfig(block_size=b, targets=targets, layers=layers))
    return student, teacher


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fit_aware_driver_matches_explicit_inputs(arch):
    student, teacher = compressed_pair(arch)
    batches = tiny_batches()
    # ridge 1e-3: LayerNorm outputs make xx near-singular, and the driver's products are float32
    fit_aware_(student, teacher, batches, ridge=1e-3, progress=False)
    names = list(fitted_modules(student))
    x = raw_inputs(teacher, names, batches)
    for n in names:
        w = teacher.get_submodule(n).weight.detach().double()
        if arch == "gpt2":
            w = w.T  # Conv1D stores (in, out)
        ref = circulant.fit_aware(w, x[n].T @ x[n], x[n].T @ x[n], 8, ridge=1e-3)
        assert rel_err(student.get_submodule(n).c.detach().double(), ref) < 1e-4, n


@pytest.mark.parametrize("arch,targets", [("llama", "mlp"), ("llama", "mlp,attn"), ("gemma3", "mlp")])
def test_fit_sequential_matches_naive_definition(arch, targets):
    """Reference: fit each module in forward order, collecting x_s by running the whole
    partially fitted student and x_t from the whole teacher (no layer caching)."""
    student, teacher = compressed_pair(arch, layers="0,2", targets=targets)
    reference = copy.deepcopy(student)
    batches = tiny_batches()
    fit_sequential_(student, teacher, batches, ridge=1e-3, progress=False)
    # forward order within a layer: inputs grouped by shared tensor, as the model runs them
    order = list(fitted_modules(reference))
    order.sort(key=lambda n: (int(n.split(".")[2]), 0 if "attn" in n and not n.endswith("o_proj") else
                              1 if "attn" in n else 2 if not n.endswith("down_proj") else 3))
    for n in order:
        x_s = raw_inputs(reference, [n], batches)[n]
        x_t = raw_inputs(teacher, [n], batches)[n]
        w = teacher.get_submodule(n).weight.detach().double()
        with torch.no_grad():  # (not .data: the module's spectra cache follows c's version counter)
            reference.get_submodule(n).c.copy_(circulant.fit_aware(w, x_s.T @ x_s, x_s.T @ x_t, 8, ridge=1e-3))
    for n in order:  # 1e-3: float32 forwards of a layer alone vs inside the model differ in rounding
        assert rel_err(student.get_submodule(n).c.detach(), reference.get_submodule(n).c.detach()) < 1e-3, n
    # the sequential fit is not the aware fit (errors compensated): layer 2 differs
    aware, _ = compressed_pair(arch, layers="0,2", targets=targets)
    fit_aware_(aware, teacher, batches, ridge=1e-3, progress=False)
    n2 = [n for n in order if ".2." in n][-1]
    assert rel_err(aware.get_submodule(n2).c.detach(), student.get_submodule(n2).c.detach()) > 1e-3


def test_fits_improve_output_agreement():
    student, teacher = compressed_pair("llama", layers="all", b=4)
    batches = tiny_batches(seed=1, n=30, pad=False)
    held = tiny_batches(seed=2, n=2, pad=False)

    def err(model):
        with torch.no_grad():
            return sum((model(**b).logits - teacher(**b).logits).norm().item() for b in held)

    frob = err(student)
    fit_aware_(student, teacher, batches, progress=False)
    aware = err(student)
    fit_sequential_(student, teacher, batches, progress=False)
    assert aware < frob and err(student) < frob


def test_driver_needs_compressed_student():
    teacher = tiny_model("llama")
    with pytest.raises(ValueError, match="compress it first"):
        fit_aware_(copy.deepcopy(teacher), teacher, tiny_batches(), progress=False)


# ---- calibration data ----

def test_overlap_is_refused_unless_forced():
    from bcllm.fit.calib_text import check_overlap

    prompts = ["Explain what a circulant matrix is in simple terms.", "Short one."]
    clean = ["The water cycle moves water between oceans, air and land.", "Bread needs flour, water and yeast."]
    assert check_overlap(clean, prompts) == 0
    leaked = clean + ["Question: explain what a CIRCULANT matrix is in simple   terms. Answer: it is ..."]
    with pytest.raises(ValueError, match="overlap the evaluation prompts.*line 3"):
        check_overlap(leaked, prompts)
    assert check_overlap(leaked, prompts, force=True) == 1
    # a shared run of 10 words counts too, even without the whole prompt
    long_prompt = ["one two three four five six seven eight nine ten eleven twelve"]
    assert check_overlap(["zero one two three four five six seven eight nine ten"], long_prompt, force=True) == 1
    assert check_overlap(["zero one two three four five six seven eight nine"], long_prompt) == 0


def test_pydoc_samples_are_prose_and_deterministic():
    from bcllm.fit.calib_text import pydoc_samples

    a, b = pydoc_samples(20, seed=1), pydoc_samples(20, seed=1)
    assert a == b and len(a) == 20 and all(len(s.split()) >= 20 for s in a)
    assert pydoc_samples(20, seed=2) != a


def test_make_batches_pads_right_with_mask():
    from bcllm.fit.calib_text import make_batches

    class Tok:
        pad_token_id = 0

        def __call__(self, text, truncation=True, max_length=None):
            return {"input_ids": [len(w) for w in text.split()][:max_length]}

    batches = make_batches(Tok(), ["a bb ccc", "dddd", "ee f", "g h i j k"], batch_size=2, max_length=4)
    assert [b["input_ids"].shape for b in batches] == [(2, 3), (1, 4)]  # 1-token sample dropped
    assert batches[0]["input_ids"].tolist() == [[2, 1, 0], [1, 2, 3]]
    assert batches[0]["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batches[1]["input_ids"].tolist() == [[1, 1, 1, 1]]  # cut to max_length


# ---- checkpoints ----

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_checkpoint_round_trip_on_fresh_model(tmp_path, arch):
    from bcllm.io.checkpoint import load_fitted, save_fitted
    from bcllm.eval.metrics import model_fingerprint

    teacher = tiny_model(arch)
    config = CirculantConfig(block_size=4, targets="mlp", layers="1-2", block_sizes={"*.0.*": 8})
    student = copy.deepcopy(teacher)
    compress_(student, config)
    fit_aware_(student, teacher, tiny_batches(n=4), progress=False)
    norm = next(n for n, m in student.named_modules() if "norm" in type(m).__name__.lower())
    with torch.no_grad():
        student.get_submodule(norm).weight.mul_(1.5)  # a trained non-structured parameter
    save_fitted(student, tmp_path / "fit", config, model_fingerprint(teacher), extra_params=[f"{norm}.weight"],
                info={"fit": "aware"})
    fresh = tiny_model(arch)
    summary = load_fitted(fresh, tmp_path / "fit")
    assert summary["fit"] == "aware" and summary["num_modules"] == len(fitted_modules(student))
    batch = tiny_batches(seed=5, n=1)[0]
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, student(**batch).logits)
    other = tiny_model(arch, seed=1)
    with pytest.raises(ValueError, match="other original weights"):
        load_fitted(other, tmp_path / "fit")
    with pytest.raises(FileNotFoundError, match="no fitted student"):
        load_fitted(tiny_model(arch), tmp_path / "nothing")


def test_checkpoint_of_other_structure(tmp_path):
    from bcllm.io.checkpoint import load_fitted, save_fitted
    from bcllm.structures import LowRankConfig

    teacher = tiny_model("llama")
    config = LowRankConfig(rank=4, targets="mlp", layers="1")
    student = copy.deepcopy(teacher)
    compress_(student, config)
    save_fitted(student, tmp_path, config)
    fresh = tiny_model("llama")
    load_fitted(fresh, tmp_path)
    batch = tiny_batches(n=1)[0]
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, student(**batch).logits)


# ---- distillation ----

def _distill_setup():
    teacher = tiny_model("llama", layers=2)
    with torch.no_grad():  # sharper logits and a larger MLP share than a random init gives: a real gap to close
        for n, p in teacher.named_parameters():
            if ".mlp." in n or n.startswith("lm_head"):
                p.mul_(10)
    student = copy.deepcopy(teacher)
    compress_(student, CirculantConfig(block_size=8, targets="mlp"))
    return student, teacher, tiny_batches(seed=3, n=4), tiny_batches(seed=4, n=2)


def test_topk_kl_is_exact_with_full_vocabulary():
    from bcllm.fit.distill import topk_kl

    g = torch.Generator().manual_seed(0)
    z_t, z_s = torch.randn(5, 30, generator=g), torch.randn(5, 30, generator=g)
    values, ids = z_t.topk(30, dim=-1)
    exact = torch.nn.functional.kl_div(torch.log_softmax(z_s, -1), torch.log_softmax(z_t, -1),
                                       log_target=True, reduction="batchmean")
    assert abs(topk_kl(z_s, (values, ids, z_t.logsumexp(-1))).item() - exact.item()) < 1e-5
    values, ids = z_t.topk(5, dim=-1)  # fewer tokens: a lower bound (bucketing loses information)
    assert topk_kl(z_s, (values, ids, z_t.logsumexp(-1))).item() <= exact.item() + 1e-6


def test_distillation_reduces_held_out_kl():
    from bcllm.fit.distill import DistillConfig, distill_, held_out_kl, _teacher_logits

    student, teacher, train, held = _distill_setup()
    held_lp = [torch.log_softmax(t, -1) for t in _teacher_logits(teacher, held)]
    before = held_out_kl(student, held_lp, held)
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if ".mlp." not in n}
    result = distill_(student, teacher, train, held, DistillConfig(steps=30, lr=1e-2, eval_every=10, topk=16),
                      progress=False)
    after = held_out_kl(student, held_lp, held)
    # random tokens on a random model: the training KL collapses, held-out KL falls less (generalisation)
    assert after < 0.9 * before and result["loss"][-1] < 0.3 * result["loss"][0]
    assert result["held_out_kl"][-1][0] == 30 and abs(result["held_out_kl"][-1][1] - after) < 1e-6
    for n, p in student.named_parameters():  # everything but the structured weights is untouched
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_distillation_resume_gives_same_state(tmp_path):
    from bcllm.fit.distill import DistillConfig, distill_

    cfg = DistillConfig(steps=6, lr=3e-3, topk=16, checkpoint_every=2, eval_every=3, hidden_mse=0.5,
                        train_norms=True, adapter_rank=2)  # (the adapters' factors resume too)
    student, teacher, train, held = _distill_setup()
    straight = distill_(copy.deepcopy(student), teacher, train, held, cfg, progress=False)

    def stop(step, loss):
        if step == 4:
            raise KeyboardInterrupt

    interrupted = copy.deepcopy(student)
    with pytest.raises(KeyboardInterrupt):
        distill_(interrupted, teacher, train, held, cfg, checkpoint_dir=tmp_path, progress=False, on_step=stop)
    resumed = copy.deepcopy(student)  # a fresh process: starts from the undistilled student
    again = distill_(resumed, teacher, train, held, cfg, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert again["loss"] == straight["loss"] and again["held_out_kl"] == straight["held_out_kl"]
    ref = copy.deepcopy(student)
    distill_(ref, teacher, train, held, cfg, progress=False)
    for (n, a), (_, b) in zip(resumed.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), n
    with pytest.raises(ValueError, match="other distillation settings: steps 6 there, 7 here"):
        distill_(copy.deepcopy(student), teacher, train, held, dataclasses.replace(cfg, steps=7),
                 checkpoint_dir=tmp_path, resume=True, progress=False)


@pytest.mark.slow
def test_smollm2_aware_fit_beats_frobenius_on_held_out_text(smollm2):
    """Layer 12 MLP at b=16: the aware fit on pydoc prose lowers the output error of the patched
    decoder layer on other text (the default prompts) below the Frobenius projection's."""
    from bcllm.fit.calib_text import make_batches, pydoc_samples
    from bcllm.io.prompts import load_prompts

    model, tok = smollm2
    frob = copy.deepcopy(model)
    compress_(frob, CirculantConfig(16, "mlp", "12"))
    aware = copy.deepcopy(frob)
    fit_aware_(aware, model, make_batches(tok, pydoc_samples(16), 8, 48), progress=False)
    held = make_batches(tok, load_prompts(None)[:16], 16, 48)

    def layer_error(student):
        outs = {}
        hooks = [m.model.layers[12].register_forward_hook(lambda mod, a, o, m=m: outs.__setitem__(id(m), o))
                 for m in (model, student)]
        err = ref = 0.0
        with torch.no_grad():
            for b in held:
                model(**b)
                student(**b)
                mask = b["attention_mask"].bool()
                t, s = outs[id(model)][mask], outs[id(student)][mask]
                err += (s - t).norm().item() ** 2
                ref += t.norm().item() ** 2
        for h in hooks:
            h.remove()
        return (err / ref) ** 0.5

    assert layer_error(aware) < layer_error(frob)


def test_adapter_forward_and_merge_match_the_explicit_corrected_weight():
    from bcllm.fit.distill import Adapter, merge_factors_

    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(12, 7)
    adapter = Adapter(copy.deepcopy(base), 3, g)
    assert torch.equal(adapter.lora_b, torch.zeros(7, 3))  # starts as the base linear
    with torch.no_grad():
        adapter.lora_b.copy_(torch.randn(7, 3, generator=g))
    x = torch.randn(5, 12, generator=g)
    w = base.weight.detach() + adapter.lora_b.detach() @ adapter.lora_a.detach()  # (out, in) by hand
    expected = x @ w.T + base.bias.detach()
    assert torch.allclose(adapter(x), expected, atol=1e-6)
    merge_factors_(base, adapter.lora_a, adapter.lora_b)
    assert torch.allclose(base(x), expected, atol=1e-6)


def test_distillation_adapters_train_dense_linears_from_the_first_structured_layer_and_merge():
    from bcllm.fit.distill import Adapter, DistillConfig, distill_
    from bcllm.surgery import num_params

    teacher = tiny_model("llama", layers=3)
    student = copy.deepcopy(teacher)
    compress_(student, CirculantConfig(block_size=8, targets="mlp", layers="1-2"))
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    count = num_params(student)
    result = distill_(student, teacher, tiny_batches(seed=3, n=4), (),
                      DistillConfig(steps=4, lr=1e-2, topk=16, adapter_rank=2), progress=False)
    assert not any(isinstance(m, Adapter) for m in student.modules()) and num_params(student) == count
    changed = sorted(n for n, p in student.named_parameters() if not torch.equal(p, before[n]))
    dense = sorted(n for n in changed if "circ" not in n and ".mlp." not in n)
    # attention of layers 1 and 2 (the compressed MLPs' layers): q, k, v, o; layer 0, norms, embeddings untouched
    assert dense == sorted(result["adapted"]) == sorted(f"model.layers.{i}.self_attn.{p}_proj.weight"
                                                         for i in (1, 2) for p in "qkvo")
    assert all(".mlp." in n for n in set(changed) - set(dense))  # and the structured weights
    structured = sum(p.numel() for n, p in before.items() if ".mlp." in n and ".layers.0." not in n)
    assert result["trainable_params"] == structured + \
        sum(2 * (w.shape[0] + w.shape[1]) for n, w in before.items() if n in dense)


def test_student_with_adapters_saves_and_loads_the_changed_dense_weights(tmp_path):
    from bcllm.io.checkpoint import load_fitted
    from bcllm.fit.student import StudentIO, StudentSpec, build_student
    from test_export import tiny_tokenizer
    from test_transforms import calib_file

    teacher = tiny_model("llama", layers=2)
    tok = tiny_tokenizer()
    tok.pad_token = "<unk>"
    spec = StudentSpec(block_size=8, layers="1", fit="sequential", distill_steps=3, adapter_rank=2,
                       calib=calib_file(tmp_path / "c.txt"), calib_samples=24)
    student, summary = build_student(teacher, tok, spec, StudentIO(save=str(tmp_path / "s")), eval_prompts=["zzz"])
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "s" / "fitted.safetensors"))
    # the factors of layer 1's q, k, v, o (rank 2), not their whole weights
    assert sorted(k for k in saved if "self_attn" in k) == sorted(
        f"adapter.model.layers.1.self_attn.{p}_proj.lora_{f}" for p in "qkvo" for f in "ab")
    assert saved["adapter.model.layers.1.self_attn.q_proj.lora_a"].shape == (2, 64)
    # a bcllm that cannot merge adapters refuses the folder by its format, not by a tensor name
    assert json.loads((tmp_path / "s" / "fitted.json").read_text())["format"] == 2
    fresh = copy.deepcopy(teacher)
    load_fitted(fresh, tmp_path / "s")
    ids = torch.randint(0, 128, (2, 9))
    assert torch.equal(fresh(ids).logits, student(ids).logits)
    assert not torch.equal(fresh.model.layers[1].self_attn.q_proj.weight, teacher.model.layers[1].self_attn.q_proj.weight)
    assert torch.equal(fresh.model.layers[0].self_attn.q_proj.weight, teacher.model.layers[0].self_attn.q_proj.weight)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_sequential_fit_of_attention_projections_runs_the_whole_layer(arch):
    """Attention takes the mask and rotary embeddings besides its input, so it cannot run alone on a
    captured input (this crashed with --targets attn): the sequential fit runs the whole layer.
    Reference: q, k and v of the first compressed layer see the teacher's own input, so their
    sequential fit equals the aware fit; o_proj sees the fitted q, k, v and differs."""
    teacher = tiny_model(arch, layers=2)
    student = copy.deepcopy(teacher)
    compress_(student, CirculantConfig(block_size=16, targets="attn", layers="1"))
    aware = copy.deepcopy(student)
    batches = tiny_batches(seed=3, n=2)
    fit_sequential_(student, teacher, batches, progress=False)
    fit_aware_(aware, teacher, batches, progress=False)
    attn_s, attn_a = student.model.layers[1].self_attn, aware.model.layers[1].self_attn
    for p in ("q_proj", "k_proj", "v_proj"):
        torch.testing.assert_close(getattr(attn_s, p).to_dense(), getattr(attn_a, p).to_dense(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(attn_s.o_proj.to_dense(), attn_a.o_proj.to_dense(), atol=1e-5)
