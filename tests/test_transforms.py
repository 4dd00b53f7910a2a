"""Function-preserving transforms (transforms.py), per-module block sizes, and their place in the pipeline."""

import copy

import pytest
import torch
from bcllm.ops import circulant
from bcllm.errors import InputError
from bcllm.fit.transforms import (MLPData, Transform, apply_transform_, permute_hidden_, permute_residual_,
                              search_hidden, search_residual)

from conftest import tiny_model


def noisy(model, seed=1):
    """Every parameter moved off its initial value (norm weights off 1 or 0), so that a transform
    that forgot a tensor changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g) * (p.std() if p.numel() > 1 and p.std() > 0 else 1))
    return model


def logits(model, seed=0):
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_same_function(a, b):
    la, lb = logits(a), logits(b)
    assert (la - lb).abs().max() <= 1e-4 * la.abs().max()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_hidden_permutation_and_scaling_keep_the_function(arch):
    model = noisy(tiny_model(arch, layers=2))
    moved = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    for layer in moved.model.layers:
        m = layer.mlp.gate_proj.out_features
        permute_hidden_(layer.mlp, torch.randperm(m, generator=g), torch.rand(m, generator=g) * 3 + 0.2)
    assert not torch.equal(moved.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    assert_same_function(model, moved)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_residual_permutation_keeps_the_function(arch):
    model = noisy(tiny_model(arch, layers=2))
    moved = copy.deepcopy(model)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(4))
    permute_residual_(moved, perm)
    assert torch.equal(moved.model.embed_tokens.weight, model.model.embed_tokens.weight[:, perm])
    assert_same_function(model, moved)
    # and its inverse restores the weights exactly
    permute_residual_(moved, torch.argsort(perm))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), moved.parameters()))


def test_residual_permutation_is_checked():
    with pytest.raises(InputError, match="permutation of 64 channels"):
        permute_residual_(tiny_model("llama", layers=1), torch.zeros(64, dtype=torch.long))


@pytest.mark.slow
def test_transforms_keep_smollm2_logits(smollm2):
    model, _ = smollm2
    moved = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    t = Transform(residual=torch.randperm(576, generator=g),
                  hidden={i: (torch.randperm(1536, generator=g), torch.rand(1536, generator=g) + 0.5) for i in (0, 12, 29)})
    apply_transform_(moved, t)
    assert_same_function(model, moved)


def block_circulant(out, inn, b, g):
    return circulant.to_dense(torch.randn(out // b, inn // b, b, dtype=torch.float64, generator=g), out, inn).double()


def mlp_data(w, x, b):
    """MLPData with its second moments computed here, independently of calibrate.input_stats."""
    xd = x.double()
    h = torch.nn.functional.silu(xd @ w[0].T) * (xd @ w[1].T)
    return MLPData(w, xd.T @ xd, h.T @ h, x, torch.nn.functional.silu, b)


def test_searches_recover_a_scrambled_block_circulant_mlp():
    """An MLP that is exactly block-circulant in some channel order, scrambled: the search finds an
    order in which the fit is exact again (objective from ~1 to ~0)."""
    g = torch.Generator().manual_seed(0)
    b, d, m = 8, 32, 64
    mlp = mlp_data((block_circulant(m, d, b, g), block_circulant(m, d, b, g), block_circulant(d, m, b, g)),
                   torch.randn(4096, d, generator=g), b)
    _, _, history, _ = search_hidden(mlp.permute_hidden(torch.randperm(m, generator=g)), 1e-8, iters=20, rescale=False)
    assert history[0] > 0.5 and history[-1] < 1e-6
    _, history, _ = search_residual([mlp.permute_stream(torch.randperm(d, generator=g))], 1e-8, iters=20)
    assert history[0] > 0.5 and history[-1] < 1e-6


def test_hidden_search_never_increases_its_objective_and_reports_it_truly():
    g = torch.Generator().manual_seed(1)
    d, m, b = 32, 64, 8
    w = (torch.randn(m, d, generator=g).double(), torch.randn(m, d, generator=g).double(),
         torch.randn(d, m, generator=g).double())
    x = torch.randn(2048, d, generator=g) * torch.linspace(0.2, 3, d)  # uneven channel scales
    mlp = mlp_data(w, x, b)
    perm, scale, history, _ = search_hidden(mlp, 1e-4, iters=6)
    assert all(a >= b for a, b in zip(history, history[1:]))
    assert len(history) > 1 and history[-1] < history[0]
    # the returned perm/scale, applied to the original weights and refitted, give the last value
    gate, up, down = w
    moved = mlp_data((gate[perm], up[perm] * scale.double()[:, None], down[:, perm] / scale.double()[None, :]), x, b)
    assert moved.error(moved.fits(1e-4)) == pytest.approx(history[-1], rel=1e-4)


def test_residual_search_never_increases_its_objective():
    g = torch.Generator().manual_seed(2)
    d, m, b = 32, 64, 8
    mlps = [mlp_data((torch.randn(m, d, generator=g).double(), torch.randn(m, d, generator=g).double(),
                      torch.randn(d, m, generator=g).double()), torch.randn(2048, d, generator=g), b) for _ in range(2)]
    perm, history, moved = search_residual(mlps, 1e-4, iters=6)
    assert all(a >= b for a, b in zip(history, history[1:]))
    assert sum(m.error(m.fits(1e-4)) for m in moved) == pytest.approx(history[-1], rel=1e-6)
    assert sorted(perm.tolist()) == list(range(d))


def test_transform_round_trips_through_its_tensors():
    t = Transform(residual=torch.tensor([1, 0, 2]), hidden={3: (torch.tensor([0, 2, 1]), torch.tensor([1.0, 2.0, 0.5]))})
    back = Transform.from_tensors(t.tensors())
    assert torch.equal(back.residual, t.residual)
    assert [torch.equal(a, b) for a, b in zip(back.hidden[3], t.hidden[3])] == [True, True]


def calib_file(path):
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(f"w{int(i)}" for i in torch.randint(2, 128, (30,), generator=g)) for _ in range(24)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_student_with_transform_saves_and_loads(tmp_path):
    from bcllm.io.checkpoint import load_fitted
    from bcllm.fit.student import StudentIO, StudentSpec, build_student
    from test_export import tiny_tokenizer

    teacher = noisy(tiny_model("llama", layers=2))
    tok = tiny_tokenizer()
    tok.pad_token = "<unk>"
    before = copy.deepcopy(teacher)
    spec = StudentSpec(block_size=8, fit="aware", transform="both", calib=calib_file(tmp_path / "c.txt"),
                       calib_samples=24)
    student, summary = build_student(teacher, tok, spec, StudentIO(save=str(tmp_path / "s")),
                                     eval_prompts=["zzz"])
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), before.parameters()))  # teacher untouched
    assert set(summary["transform"]["history"]) == {"residual", "hidden.0", "hidden.1"}
    fresh = copy.deepcopy(teacher)
    load_fitted(fresh, tmp_path / "s")
    assert torch.equal(logits(fresh), logits(student))
    plain, _ = build_student(teacher, tok, StudentSpec(block_size=8, fit="aware", calib=spec.calib, calib_samples=24),
                             eval_prompts=["zzz"])
    assert not torch.equal(logits(plain), logits(student))  # the transform changed the student


def test_transform_is_refused_where_it_cannot_help():
    from bcllm.fit.student import StudentSpec

    with pytest.raises(InputError, match="invariant"):
        StudentSpec(structure="lowrank", transform="hidden")
    with pytest.raises(InputError, match="unknown transform"):
        StudentSpec(transform="rotate")


def test_block_sizes_per_module_and_lowrank_at_the_same_budgets():
    from bcllm.fit.student import StudentSpec, config_for
    from bcllm.surgery import compress_

    sizes = "*.layers.0.mlp.*=4,*.layers.1.mlp.down_proj=32"
    circ = tiny_model("llama", layers=2)
    summary = compress_(circ, config_for(StudentSpec(block_size=16, layers="0-1", block_sizes=sizes)))
    got = {n: s["block_size"] for n, s in summary["sizes"].items()}
    assert got["model.layers.0.mlp.up_proj"] == 4 and got["model.layers.1.mlp.down_proj"] == 32
    assert got["model.layers.1.mlp.gate_proj"] == 16
    low = tiny_model("llama", layers=2)
    summary = compress_(low, config_for(StudentSpec(structure="lowrank", block_size=16, layers="0-1", block_sizes=sizes)))
    for name, module in low.named_modules():
        if name in summary["sizes"]:  # each low-rank module within its own circulant budget, and near it
            budget = circulant.grid_shape(module.out_features, module.in_features, got[name])
            budget = budget[0] * budget[1] * got[name]
            rank = summary["sizes"][name]["rank"]
            assert rank * (module.out_features + module.in_features) <= budget
            assert (rank + 1) * (module.out_features + module.in_features) > budget
    with pytest.raises(InputError, match="PATTERN=SIZE"):
        StudentSpec(block_sizes="layers.0=x")
