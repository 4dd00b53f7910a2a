"""CUDA: cuFFT / cuBLAS products against explicit dense references, in float32 and 16-bit.
Skipped where torch sees no GPU; scripts/gpu_check.sh runs them when one is lent."""

import copy

import pytest
import torch
from conftest import tiny_model

from bcllm import CirculantConfig, compress_
from bcllm.ops import circulant
from bcllm.structures import BlockCirculantLinear, FusedCirculantMLP, fuse_circulant_mlp_

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = "cuda"
# relative error allowed per input dtype: float32 products vs a float64 reference; 16-bit ones
# differ by the rounding of their inputs' product to the output dtype (2^-8 bf16, 2^-11 fp16)
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# On CUDA every product takes circulant_matmul_planar (the CPU kernel never runs there), whose
# branches are the block size (DFT tables up to DFT_MATMUL_MAX_BLOCK = 64, cuFFT rfft/irfft above),
# its parity (even b folds the Nyquist frequency into frequency 0, in both branches) and padding
# (b dividing both sides or not). One shape per combination:
SHAPES = [(256, 192, 1),     # tables; b = 1: one frequency, no fold
          (256, 192, 16),    # tables, even, exact
          (200, 192, 16),    # tables, even, padding on the output side only (the input needs none)
          (130, 210, 20),    # tables, even, not a power of two, padding on both sides
          (130, 211, 7),     # tables, odd, padding on both sides
          (256, 192, 64),    # tables, the largest block size they take
          (200, 300, 65),    # cuFFT, odd (no Nyquist), the smallest block size it takes, padding
          (256, 384, 128),   # cuFFT, even, a power of two, exact
          (300, 200, 96)]    # cuFFT, even, not a power of two, padding on both sides
# 1 row (decode) and several: no branch depends on the row count on CUDA
ROWS = [1, 9]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def layer_on_cuda(out_f, in_f, b, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    layer = BlockCirculantLinear(in_f, out_f, b, device=CUDA, dtype=dtype)
    with torch.no_grad():
        layer.bias.normal_()
    return layer


def reference(layer, x):
    """x @ W.T + bias in float64 from the layer's own (possibly 16-bit) parameters."""
    return x.double() @ circulant.to_dense(layer.c.double(), layer.out_features, layer.in_features).T \
        + layer.bias.double()


def test_shapes_reach_both_branches():
    assert {b > circulant.DFT_MATMUL_MAX_BLOCK for _, _, b in SHAPES} == {False, True}
    assert {b % 2 for _, _, b in SHAPES if b > circulant.DFT_MATMUL_MAX_BLOCK} == {0, 1}


def count_ffts(monkeypatch):
    """Calls of torch.fft.rfft / irfft from now on (the cuFFT branch of the product)."""
    calls = []
    for name in ("rfft", "irfft"):
        real = getattr(torch.fft, name)
        monkeypatch.setattr(torch.fft, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    return calls


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("out_f,in_f,b", SHAPES)
@pytest.mark.parametrize("n", ROWS)
def test_product_matches_dense(monkeypatch, out_f, in_f, b, n, dtype):
    layer = layer_on_cuda(out_f, in_f, b, dtype)
    x = torch.randn(n, in_f, device=CUDA, dtype=dtype)
    with torch.no_grad():
        layer.spectra()  # cached now: the product below computes no spectra of its own
    ffts = count_ffts(monkeypatch)
    with torch.inference_mode():
        y = layer(x)
    monkeypatch.undo()
    # the branch this shape is here for: cuFFT above DFT_MATMUL_MAX_BLOCK, the DFT tables up to it
    assert ffts == (["rfft", "irfft"] if b > circulant.DFT_MATMUL_MAX_BLOCK else [])
    assert y.device.type == "cuda" and y.dtype == dtype and y.shape == (n, out_f)
    assert rel_err(y, reference(layer, x)) < TOL[dtype]


@pytest.mark.parametrize("b", [16, 128])
@pytest.mark.parametrize("n", [1, 512])
def test_both_paths_on_cuda(monkeypatch, n, b):
    def no_kernel(*a, **k):
        raise AssertionError("the CPU kernel was called on CUDA")

    monkeypatch.setattr(circulant.kernel, "circulant_decode", no_kernel)
    torch.manual_seed(0)
    p, q = circulant.grid_shape(380, 270, b)  # padding on both sides
    c = torch.randn(p, q, b, device=CUDA)
    spec = circulant.spectra(c)
    x = torch.randn(n, 270, device=CUDA)
    ref = x.double() @ circulant.to_dense(c.double(), 380, 270).T
    for path in (circulant.circulant_matmul_planar, circulant.circulant_matmul):
        assert rel_err(path(x, spec, 380, 270, b), ref) < 1e-4, path.__name__


def test_autocast_runs():
    layer = layer_on_cuda(256, 192, 16)
    for n in (1, 64):  # few and many rows; float32 parameters under bf16 autocast
        x = torch.randn(n, 192, device=CUDA)
        with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
            y = layer(x)
        assert rel_err(y, reference(layer, x)) < 1e-2  # float32 product under autocast


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [3, 40])
@pytest.mark.parametrize("out_f,in_f,b", [(130, 210, 20), (200, 300, 96)])  # DFT tables; cuFFT
def test_gradients_flow(n, dtype, out_f, in_f, b):
    layer = layer_on_cuda(out_f, in_f, b, dtype)
    x = torch.randn(n, in_f, device=CUDA, dtype=dtype, requires_grad=True)
    w = torch.randn(n, out_f, device=CUDA, dtype=torch.float64)
    (layer(x).double() * w).sum().backward()
    c64 = layer.c.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    (x64 @ circulant.to_dense(c64, out_f, in_f).T * w).sum().backward()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert layer.c.grad.dtype == dtype and layer.c.grad.device.type == "cuda"
    assert rel_err(layer.c.grad, c64.grad) < tol
    assert rel_err(x.grad, x64.grad) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_mlp_equals_unfused(dtype):
    model = tiny_model("llama")
    compress_(model, CirculantConfig(block_size=16, targets="mlp"))
    model.to(CUDA, dtype)
    fused = copy.deepcopy(model)
    assert len(fuse_circulant_mlp_(fused)) == 4
    assert isinstance(fused.model.layers[0].mlp, FusedCirculantMLP)
    ids = torch.randint(0, 128, (2, 7), device=CUDA)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    with torch.inference_mode():
        assert rel_err(fused(ids).logits, model(ids).logits) < tol          # prefill: many rows
        assert rel_err(fused(ids[:1, :1]).logits, model(ids[:1, :1]).logits) < tol  # one row: real path
        if dtype == torch.float32:
            a = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
            f = fused.generate(ids[:1], max_new_tokens=6, do_sample=False)
            assert torch.equal(a, f)


def test_compressed_tiny_llama_same_logits_on_cuda_as_on_cpu():
    model = tiny_model("llama")
    compress_(model, CirculantConfig(block_size=16, targets="mlp"))
    fuse_circulant_mlp_(model)
    ids = torch.randint(0, 128, (2, 9))
    with torch.inference_mode():
        cpu_logits = (model(ids).logits, model(ids[:1, :1]).logits)  # spectra now cached on the CPU
    model.to(CUDA)  # the caches must follow the parameters (outside inference mode: see bench_layer)
    with torch.inference_mode():
        gpu_logits = (model(ids.to(CUDA)).logits, model(ids[:1, :1].to(CUDA)).logits)
    for cpu, gpu in zip(cpu_logits, gpu_logits):
        assert gpu.device.type == "cuda"
        assert rel_err(gpu.cpu(), cpu) < 1e-4


def test_cuda_graph_decode_gives_the_eager_tokens():
    """The lean loop with every decode step replayed as a CUDA graph (bench model --cuda-graphs)
    decodes the same greedy tokens as the eager loop, for the dense model and a fused student."""
    from bcllm.bench.measure import compile_steps, lean_decode
    from bcllm.io.models import static_cache

    model = tiny_model("llama", layers=2).to(CUDA)
    student = copy.deepcopy(model)
    compress_(student, CirculantConfig(block_size=16, targets="mlp"))
    fuse_circulant_mlp_(student)
    ids = torch.tensor([[5, 9, 2, 7, 1]], device=CUDA)
    models = {"dense": model, "compressed": student}
    with torch.inference_mode():
        caches = {n: static_cache(m, 16) for n, m in models.items()}
        eager = {n: lean_decode(m, ids, 8, caches[n])[1] for n, m in models.items()}
        steps, _, error = compile_steps(models, ids, caches, cuda_graphs=True)
        assert error is None
        for n, m in models.items():
            assert torch.equal(lean_decode(m, ids, 8, caches[n], steps[n])[1], eager[n]), n
