"""Fast execution paths against the reference product and explicit dense matrices; fused MLP
against the unfused model; the analytic cost model against hand counts; bench plumbing.
No timings are asserted here (benchmarks are not unit tests)."""

import copy
import json
import math

import pytest
import torch
from conftest import tiny_model

from bcllm import CirculantConfig, compress_
from bcllm.ops import circulant, circulant_math
from bcllm.ops import costs
from bcllm.bench.measure import llc_bytes, parse_ints, parse_shape
from bcllm.errors import InputError
from bcllm.cli import main
from bcllm.structures import BlockCirculantLinear, FusedCirculantMLP, fuse_circulant_mlp_, model_costs


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("out_f,in_f,b", [(16, 24, 8), (9, 7, 3), (10, 13, 4), (5, 5, 5), (4, 4, 1),
                                          (17, 33, 8), (96, 64, 16), (130, 200, 64), (200, 150, 65),
                                          (260, 300, 128)])
@pytest.mark.parametrize("n", [1, 3, 8, 9, 20, 130])
def test_fast_paths_match_explicit_dense(out_f, in_f, b, n):
    """Planar path (table DFTs up to b = 64, FFTs above) and the dispatcher against x @ W.T."""
    torch.manual_seed(0)
    p, q = circulant.grid_shape(out_f, in_f, b)
    c = torch.randn(p, q, b)
    spec = circulant.spectra(c)
    assert spec.shape == (2, (b + 1) // 2, q, p) and spec.dtype == torch.float32
    x = torch.randn(n, in_f)
    dense = x.double() @ circulant.to_dense(c.double(), out_f, in_f).T
    for path in (circulant.circulant_matmul_planar, circulant.circulant_matmul):
        y = path(x, spec, out_f, in_f, b)
        assert y.shape == (n, out_f)
        assert rel_err(y.double(), dense) < 1e-5


@pytest.mark.parametrize("b", [8, 65])
def test_planar_path_gradients_match_explicit_dense(b):
    torch.manual_seed(0)
    c = torch.randn(3, 4, b, requires_grad=True)
    x = torch.randn(5, 4 * b - 2, requires_grad=True)
    out_f = 3 * b - 3
    weights = torch.arange(5 * out_f).view(5, out_f).sin()
    grads = []
    for product in (lambda: circulant.circulant_matmul_planar(x, circulant.spectra(c), out_f, 4 * b - 2, b),
                    lambda: x @ circulant.to_dense(c, out_f, 4 * b - 2).T):
        c.grad = x.grad = None
        (product() * weights).sum().backward()
        grads.append((c.grad.clone(), x.grad.clone()))
    assert rel_err(grads[0][0], grads[1][0]) < 1e-5
    assert rel_err(grads[0][1], grads[1][1]) < 1e-5


def test_dft_tables_built_in_inference_mode_serve_autograd_later():
    circulant.dft_tables.cache_clear()
    layer = BlockCirculantLinear(12, 12, 6)
    with torch.inference_mode():
        layer(torch.randn(1, 12))
    layer(torch.randn(1, 12)).sum().backward()  # must not raise "inference tensors cannot be saved"
    assert layer.c.grad is not None


def count_spectra_calls(monkeypatch):
    calls = []
    real = circulant_math.spectra  # the one the spectra cache calls
    monkeypatch.setattr(circulant_math, "spectra", lambda c: calls.append(1) or real(c))
    return calls


def test_spectra_never_recomputed_per_forward_at_inference(monkeypatch):
    model = tiny_model("llama")
    compress_(model, CirculantConfig(block_size=16, targets="mlp"))
    fuse_circulant_mlp_(model)
    calls = count_spectra_calls(monkeypatch)
    ids = torch.randint(0, 128, (1, 6))
    with torch.inference_mode():
        model(ids)
        first = len(calls)
        for _ in range(3):
            model(ids[:, :1])
    assert first == 4 * 2  # per layer: fused gate+up, down
    assert len(calls) == first


def fused_pair(**config):
    model = tiny_model("llama")
    compress_(model, CirculantConfig(**config))
    fused = copy.deepcopy(model)
    names = fuse_circulant_mlp_(fused)
    return model, fused, names


@pytest.mark.parametrize("b", [16, 20])  # 20: gate rows padded (96 = 4*20 + 16)
def test_fused_mlp_same_outputs_prefill_and_decode(b):
    model, fused, names = fused_pair(block_size=b, targets="mlp")
    assert len(names) == 4 and all(isinstance(fused.get_submodule(n), FusedCirculantMLP) for n in names)
    assert fused.state_dict().keys() == model.state_dict().keys()
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        assert rel_err(fused(ids).logits, model(ids).logits) < 1e-5
        a = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
        f = fused.generate(ids[:1], max_new_tokens=6, do_sample=False)
    assert torch.equal(a, f)


def test_fused_mlp_with_bias_and_dense_down_proj():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=2, mlp_bias=True)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            torch.nn.init.normal_(m.bias)
    compress_(model, CirculantConfig(block_size=8, targets=["gate_proj", "up_proj"]))
    fused = copy.deepcopy(model)
    assert len(fuse_circulant_mlp_(fused)) == 2
    x = torch.randn(3, 5, 64)
    mlp, fmlp = model.model.layers[1].mlp, fused.model.layers[1].mlp
    with torch.no_grad():
        assert rel_err(fmlp(x), mlp(x)) < 1e-5
        assert rel_err(fmlp(x[:1, :1]), mlp(x[:1, :1])) < 1e-5  # the real (decode) path


def test_fused_mlp_gradients_match_unfused():
    model, fused, _ = fused_pair(block_size=16, targets="mlp")
    ids = torch.randint(0, 128, (2, 5))
    for m in (model, fused):
        m.train()
        m(ids, labels=ids).loss.backward()
    for (name, p), (_, pf) in zip(model.named_parameters(), fused.named_parameters()):
        if name.endswith(".c"):
            assert rel_err(pf.grad, p.grad) < 1e-4, name


def test_unequal_block_sizes_are_not_fused():
    _, fused, names = fused_pair(block_size=16, targets="mlp", block_sizes={"up_proj": 8})
    assert names == []
    assert not any(isinstance(m, FusedCirculantMLP) for m in fused.modules())


def test_cost_model_hand_counts():
    d = costs.dense_costs(6, 4)
    assert (d["flops"], d["bytes"], d["params"]) == (48, 96, 24)
    # 8x12 at b=4: p=2, q=3, F=2 (Nyquist folded); product 8*2*3*2 = 96, FFTs 2.5*4*log2(4)*(3+2) = 100;
    # bytes 8*2*3*2 = 96, as many as c's floats
    c = costs.circulant_costs(8, 12, 4)
    assert (c["flops"], c["bytes"], c["params"]) == (196, 96, 24)
    # byte ratios: exactly b for even b that divides both sides (the 62x and 14.2x counted
    # b + 2 floats a block); odd b stores one float more: 25x20 at b=5, (5+1)/25 of the dense bytes
    for (o, i, b), ratio in [((11008, 4096, 64), 64), ((1536, 576, 16), 16), ((25, 20, 5), 25 / 6)]:
        r = costs.dense_costs(o, i)["bytes"] / costs.circulant_costs(o, i, b)["bytes"]
        assert r == pytest.approx(ratio, abs=0.05)


def test_model_costs_count_every_linear_layer():
    model = tiny_model("llama", layers=2)  # hidden 64, mlp 96, 4 heads of 16, 2 kv heads, vocab 128
    per_layer = 2 * (64 * 64 * 2 + 32 * 64 * 2 + 3 * 64 * 96)
    dense = model_costs(model)
    assert dense["flops"] == 2 * per_layer + 2 * 128 * 64
    assert dense["dense_layers"] == 2 * 7 + 1
    compress_(model, CirculantConfig(block_size=16, targets="mlp"))
    fuse_circulant_mlp_(model)
    comp = model_costs(model)
    F, fft = 8, 2.5 * 16 * 4  # 8 stored frequencies at b = 16 (Nyquist folded)
    gate_up = 8 * F * 4 * 6 * 2 + fft * (4 + 12)   # shared rfft of 4 input blocks, 2 x 6 output blocks
    down = 8 * F * 6 * 4 + fft * (6 + 4)
    attn = 2 * (64 * 64 * 2 + 32 * 64 * 2)
    assert comp["flops"] == pytest.approx(2 * (gate_up + down + attn) + 2 * 128 * 64)
    assert comp["circulant_layers"] == 6 and comp["dense_layers"] == 2 * 4 + 1
    assert comp["bytes"] == 2 * (8 * F * (4 * 12 + 6 * 4) + 4 * attn // 2) + 4 * 128 * 64


def test_bench_helpers():
    assert llc_bytes() > 0
    assert parse_shape("11008x4096") == (11008, 4096)
    assert parse_ints("1,16,128", "--tokens") == [1, 16, 128]
    with pytest.raises(ValueError, match="OUTxIN"):
        parse_shape("11008*4096")
    with pytest.raises(ValueError, match="positive"):
        parse_ints("0,4", "--tokens")


def test_bench_layer_cli_single_point_json(tmp_path, capsys):
    path = tmp_path / "layer.json"
    # a shape big enough that few distinct weights exceed the last-level cache (quick to build)
    assert main(["bench", "layer", "--shape", "2048x1024", "--block-size", "16", "--tokens", "1",
                 "--repeats", "3", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["speedup"] > 0 and data["block_size"] == 16 and data["shape"] == "2048x1024"
    assert data["byte_ratio"] == pytest.approx(2048 * 1024 * 4 / (8 * 8 * 64 * 128))  # F = 8 at b = 16
    assert {"cpu", "threads", "torch"} <= data["versions"].keys()
    assert "| 2048x1024 | 16 | 1 |" in path.with_suffix(".md").read_text()
    # the int8 weight-only dense layer beside it (PyTorch's CPU kernel exists in the pinned torch)
    assert data["int8_dense_us"] > 0 and data["int8_dense_speedup"] == pytest.approx(
        data["dense_us"] / data["int8_dense_us"])
    assert data["int8_dense_byte_ratio"] == pytest.approx(2048 * 1024 * 4 / (2048 * 1024 + 2048 * 2))
    assert data["int8_dense_activations"] == "bfloat16"


def test_int8_weight_only_product_against_its_dequantised_weight():
    """The int8 baseline of bench layer: codes within [-127, 127], each row's largest |w| on the
    grid's end, and the kernel's product equal to x (codes * scales)^T computed in float64."""
    from bcllm.bench.measure import int8_dense_product, int8_weight_only

    torch.manual_seed(0)
    w = torch.randn(48, 80)
    codes, scales = int8_weight_only(w)
    assert codes.dtype == torch.int8 and codes.abs().max() == 127 and scales.shape == (48,)
    assert torch.equal(codes.abs().amax(1), torch.full((48,), 127, dtype=torch.int8))
    assert (codes.float() * scales[:, None] - w).abs().max() <= scales.max() / 2 + 1e-6  # round to nearest
    x = torch.randn(3, 80)
    y = int8_dense_product(x, codes, scales)
    ref = x.double() @ (codes.double() * scales.double()[:, None]).T
    assert y is not None and torch.allclose(y.double(), ref, atol=1e-4)
    y16 = int8_dense_product(x.bfloat16(), codes, scales.bfloat16())  # as bench layer runs it on a float32 model
    assert y16.dtype == torch.bfloat16 and torch.allclose(y16.double(), ref, rtol=0.02, atol=0.05)


def test_bench_cli_errors(tmp_path, capsys):
    assert main(["bench", "layer", "--shape", "64x64", "--block-size", "128", "--tokens", "1"]) == 2
    assert "exceeds" in capsys.readouterr().err
    assert main(["bench", "layer", "--shape", "64x64", "--json", str(tmp_path / "no" / "x.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bench_model_on_tiny_model(tmp_path):
    from bcllm.bench.measure import bench_model

    model = tiny_model("llama", layers=2)
    student = copy.deepcopy(model)
    compress_(student, CirculantConfig(block_size=16, targets="mlp"))
    fuse_circulant_mlp_(student)
    r = bench_model(model, student, [[1, 2, 3, 4], [5, 6]], new_tokens=3, repeats=1, compile=False)
    assert r["prefill_tokens"] == 6 and r["new_tokens"] == 3 and not r["compiled"]
    assert r["eager_decode_speedup"] == r["decode_speedup"]
    assert r["prefill_speedup"] == pytest.approx(r["compressed_prefill_tokens_per_s"] / r["dense_prefill_tokens_per_s"])
    assert r["compressed_param_bytes"] < r["dense_param_bytes"]
    assert math.isfinite(r["decode_speedup"]) and r["decode_byte_ratio"] > 1


def test_cuda_graphs_are_refused_off_the_gpu():
    from bcllm.bench.measure import bench_model

    model = tiny_model("llama", layers=1)
    with pytest.raises(InputError, match="--device cuda") as e:
        bench_model(model, copy.deepcopy(model), [[1, 2]], new_tokens=2, repeats=1, cuda_graphs=True)
    assert e.value.param == "cuda_graphs"


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_lean_decode_gives_hf_generate_tokens(arch):
    """The lean loop (static cache, last-position logits) decodes the same greedy tokens as
    Hugging Face generate, for the dense model and a fused circulant student."""
    from bcllm.bench.measure import lean_decode

    model = tiny_model(arch, layers=2)
    student = copy.deepcopy(model)
    compress_(student, CirculantConfig(block_size=16, targets="mlp"))
    fuse_circulant_mlp_(student)
    ids = torch.tensor([[5, 9, 2, 7, 1]])
    for m in (model, student):
        with torch.inference_mode():
            _, tokens = lean_decode(m, ids, 6)
            ref = m.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                             attention_mask=torch.ones_like(ids))
        assert tokens.tolist() == ref[:, ids.shape[1]:].tolist()


def test_alternate_runs_each_prompt_on_both_models_in_turn():
    from bcllm.bench.measure import alternate

    calls = []

    def run(kind):
        return lambda name, ids: calls.append((kind, name, ids)) or {"dense": 2.0, "compressed": 0.5}[name] * ids

    class Bar:
        total, done = None, 0

        def reset(self, total):
            self.total = total

        def update(self, n):
            self.done += n

    bar = Bar()
    seconds = alternate({"a": run("a"), "b": run("b")}, ["dense", "compressed"], [1, 3], repeats=2, progress=bar)
    assert calls[:6] == [("a", "dense", 1), ("a", "compressed", 1), ("a", "dense", 3), ("a", "compressed", 3),
                         ("b", "dense", 1), ("b", "compressed", 1)]
    assert seconds == {"a": {"dense": [8.0, 8.0], "compressed": [2.0, 2.0]},
                       "b": {"dense": [8.0, 8.0], "compressed": [2.0, 2.0]}}
    assert (bar.total, bar.done) == (4, 4)


def test_compiled_lean_decode_is_one_graph_with_the_kernel_and_same_tokens(monkeypatch):
    """Under torch.compile the fused student's decode step is a single graph (the kernel is an
    operator, the spectra a captured cache), decodes the eager tokens, and compiles once for
    prompts of different lengths sharing one static cache."""
    from bcllm.ops import kernel
    from bcllm.bench.measure import lean_decode, static_cache

    torch._dynamo.reset()
    student = tiny_model("llama", layers=2)
    compress_(student, CirculantConfig(block_size=16, targets="mlp"))
    fuse_circulant_mlp_(student)
    # the tiny spectra would all run on one thread; SmolLM2's take the all-threads branch, which
    # must not ask torch for a thread count inside the graph (a break per product)
    monkeypatch.setattr(circulant, "KERNEL_SINGLE_THREAD_MAX_BYTES", 0)
    prompts = [torch.tensor([[5, 9, 2, 7, 1]]), torch.tensor([[3, 4]])]
    cache = static_cache(student, 12)
    with torch.inference_mode():
        eager = [lean_decode(student, ids, 6, cache)[1] for ids in prompts]
        token, position = prompts[0][:, -1:], torch.tensor([5])
        explained = torch._dynamo.explain(student)(token, cache_position=position, past_key_values=cache,
                                                   use_cache=True, logits_to_keep=1)
        assert explained.graph_count == 1 and explained.graph_break_count == 0
        torch._dynamo.reset()
        step = torch.compile(student, dynamic=False)
        from torch._dynamo.utils import counters
        counters.clear()
        compiled = [lean_decode(student, ids, 6, cache, step)[1] for ids in prompts]
    assert [t.tolist() for t in compiled] == [t.tolist() for t in eager]
    assert counters["stats"]["unique_graphs"] == 1
    if kernel.load() is not None and not kernel.disabled():
        assert "bcllm.circulant_decode" in str(explained.graphs[0].graph) or \
            "bcllm::circulant_decode" in str(explained.graphs[0].graph)
    monkeypatch.setenv(kernel.DISABLE_ENV, "1")  # the torch path (as on a GPU) is one graph too
    torch._dynamo.reset()
    with torch.inference_mode():
        explained = torch._dynamo.explain(student)(token, cache_position=position, past_key_values=cache,
                                                   use_cache=True, logits_to_keep=1)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    assert "circulant_decode" not in str(explained.graphs[0].graph)


def test_memory_bandwidth_is_a_copy_rate():
    from bcllm.bench.measure import memory_bandwidth

    rate = memory_bandwidth(mib=8, repeats=2)
    assert 1e8 < rate < 1e13  # between 0.1 GB/s and 10 TB/s: a rate, in bytes per second


def test_bench_layer_leaves_the_int8_column_empty_where_the_kernel_cannot_take_the_inputs():
    """Inputs not in 32s would crash PyTorch's int8 kernel: the point is timed without it."""
    from bcllm.bench.measure import bench_layer, layer_table

    row = bench_layer(48, 40, 8, 1, repeats=2, budget_s=0.2)
    assert row["speedup"] > 0 and row["int8_dense_us"] is None and row["int8_dense_speedup"] is None
    assert "| – | – |" in layer_table([row])
