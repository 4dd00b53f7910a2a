"""compress_ selects exactly the requested modules, on several architectures and on SmolLM2."""

import copy

import pytest
import torch

from bcllm import BlockCirculantLinear, CirculantConfig, compress_
from bcllm.surgery import parse_layers, select_modules
from conftest import tiny_model


def circulant_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, BlockCirculantLinear))


def test_parse_layers():
    assert parse_layers("10-12", 30) == [10, 11, 12]
    assert parse_layers("0,3,5", 30) == [0, 3, 5]
    assert parse_layers("0-2,8", 30) == [0, 1, 2, 8]
    assert parse_layers("all", 30) is None
    assert parse_layers(range(2, 4), 30) == [2, 3]
    with pytest.raises(ValueError, match="out of range.*0..29"):
        parse_layers("28-31", 30)
    with pytest.raises(ValueError, match="cannot parse"):
        parse_layers("ten", 30)


@pytest.mark.parametrize("arch,mlp_count,attn_count", [
    ("llama", 3, 4), ("qwen2", 3, 4), ("mistral", 3, 4), ("gemma3", 3, 4), ("phi", 2, 4), ("gpt2", 2, 2)])
def test_shorthands_on_architectures(arch, mlp_count, attn_count):
    model = tiny_model(arch, layers=3)
    ids = torch.randint(0, 128, (1, 6))
    before = {n: p.clone() for n, p in model.named_parameters()}
    summary = compress_(model, CirculantConfig(block_size=8, targets="mlp", layers="1-2"))
    names = circulant_names(model)
    assert len(names) == summary["num_modules"] == 2 * mlp_count
    assert all(".1." in n or ".2." in n for n in names)
    # untouched parameters are still there and equal
    after = dict(model.named_parameters())
    for n, p in before.items():
        if n in after:
            assert torch.equal(after[n], p)
    out = model(ids).logits
    assert torch.isfinite(out).all()
    compress_(model, CirculantConfig(block_size=8, targets=["attn"], layers=[0]))
    assert len(circulant_names(model)) == 2 * mlp_count + attn_count


def test_counts_and_summary(tiny_llama):
    n_before = sum(p.numel() for p in tiny_llama.parameters())
    s = compress_(tiny_llama, CirculantConfig(block_size=16, targets=["gate_proj", "up_proj"]))
    assert s["num_modules"] == 8
    # 64x96 weights: each 96*64 dense -> 6*4*16 circulant
    assert s["replaced_params"] == 8 * 96 * 64
    assert s["structured_params"] == 8 * 6 * 4 * 16
    assert s["ratio"] == pytest.approx(16)
    assert s["model_params_before"] == n_before
    assert s["model_params_after"] == sum(p.numel() for p in tiny_llama.parameters())


def test_glob_and_per_module_block_size(tiny_llama):
    cfg = CirculantConfig(block_size=8, targets=["*.mlp.down_proj", "q_proj"], layers="0",
                          block_sizes={"down_proj": 32})
    compress_(tiny_llama, cfg)
    layer = tiny_llama.model.layers[0]
    assert layer.mlp.down_proj.block_size == 32
    assert layer.self_attn.q_proj.block_size == 8
    assert circulant_names(tiny_llama) == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"]


def test_projection_values_in_model(tiny_llama):
    dense = tiny_llama.model.layers[2].mlp.up_proj.weight.detach().clone()
    compress_(tiny_llama, CirculantConfig(block_size=1, targets="up_proj"))
    assert torch.allclose(tiny_llama.model.layers[2].mlp.up_proj.to_dense(), dense)


def test_gpt2_conv1d_weight_is_transposed():
    model = tiny_model("gpt2", layers=2)
    conv = model.transformer.h[0].mlp.c_fc
    x = torch.randn(3, 64)
    ref = conv(x)
    compress_(model, CirculantConfig(block_size=1, targets="c_fc", layers="0"))
    assert torch.allclose(model.transformer.h[0].mlp.c_fc(x), ref, atol=1e-5)


@pytest.mark.parametrize("cfg,match", [
    (CirculantConfig(block_size=0), "block_size must be >= 1"),
    (CirculantConfig(block_size=128), "larger than the layer's smaller dimension"),
    (CirculantConfig(targets=["gate_prj"]), "matches no module.*gate_proj.*up_proj"),
    (CirculantConfig(layers="3-7"), "out of range"),
    (CirculantConfig(targets=["input_layernorm"]), "not a linear layer"),
])
def test_bad_config_is_refused_and_model_unchanged(tiny_llama, cfg, match):
    state = copy.deepcopy(tiny_llama.state_dict())
    with pytest.raises(ValueError, match=match):
        compress_(tiny_llama, cfg)
    assert circulant_names(tiny_llama) == []
    assert all(torch.equal(v, state[k]) for k, v in tiny_llama.state_dict().items())


def test_block_size_too_large_for_one_module_leaves_model_unchanged(tiny_llama):
    cfg = CirculantConfig(block_size=8, targets="attn", block_sizes={"k_proj": 64})  # k_proj is 32x64
    with pytest.raises(ValueError, match="k_proj"):
        compress_(tiny_llama, cfg)
    assert circulant_names(tiny_llama) == []


@pytest.mark.slow
def test_smollm2_all_mlp(smollm2):
    model, tok = smollm2
    model = copy.deepcopy(model)
    assert len(select_modules(model, "mlp")) == 90
    s = compress_(model, CirculantConfig(block_size=16, targets="mlp", layers="all"))
    assert s["num_modules"] == 90 and len(circulant_names(model)) == 90
    assert s["ratio"] == pytest.approx(16)
    assert isinstance(model.model.layers[5].self_attn.q_proj, torch.nn.Linear)
    ids = tok("Explain what a circulant matrix is.", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.input_ids.shape[1] + 5
