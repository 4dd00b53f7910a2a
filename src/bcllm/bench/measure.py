"""Speed benchmarks: dense vs block-circulant, per layer and end to end, in the same run.

Every figure is a ratio to the dense layer or model measured in the same process,
with the analytic FLOP and byte ratios (costs.py) beside it. Timings are medians
over repeats after warm-up.

Layer: "hot" calls one weight over and over (it stays in cache); "cold" rotates over
enough distinct weights to exceed twice the last-level cache, as in decoding where each
layer's weights are read once per token. `speedup` is the cold one.

Model: prefill tokens/s (one forward over each prompt) and greedy decode tokens/s with
the KV cache on, for the dense and the compressed model on the same prompts, dense and
compressed alternating in each repeat so that both see the same machine load.
"""

from __future__ import annotations

import contextlib
import functools
import math
import statistics
import subprocess
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from ..io.models import cache_kwargs, static_cache
from ..ops import circulant, kernel
from ..ops import costs
from ..structures.circulant import BlockCirculantLinear
from ..structures.quantized import int8_decode_fits
from ..structures.costs import model_costs

DEFAULT_TOKENS = (1, 16, 128, 512)
EXTRA_SHAPES = ((4096, 4096), (11008, 4096))
MAX_COLD_WEIGHTS = 2048


def llc_bytes() -> int:
    """Size of the last-level cache: /sys first, then lscpu; 32 MiB if neither says."""
    sizes = {}
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip().upper()
        except (OSError, ValueError):
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes[level] = int(text.rstrip("KMG")) * unit
    if sizes:
        return sizes[max(sizes)]
    try:
        out = subprocess.run(["lscpu", "-B"], capture_output=True, text=True, timeout=10).stdout
        for name in ("L3 cache", "L2 cache"):
            for line in out.splitlines():
                if line.startswith(name):
                    return int(line.split(":", 1)[1].split()[0])
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    return 32 << 20


def gpu_l2_bytes(device) -> int:
    """The GPU's L2 cache, the last level a weight read passes through there (H100/H200: 50-60 MiB)."""
    return getattr(torch.cuda.get_device_properties(torch.device(device)), "L2_cache_size", 0) or 50 << 20


def parse_shape(text: str) -> tuple[int, int]:
    try:
        out_features, in_features = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(f"cannot parse shape {text!r}: write OUTxIN, e.g. 11008x4096") from None
    if out_features < 1 or in_features < 1:
        raise InputError(f"shape {text!r} must have positive dimensions")
    return out_features, in_features


def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise InputError(f"cannot parse {what} {text!r}: give integers separated by commas, e.g. 1,16,128") from None
    if not values or min(values) < 1:
        raise InputError(f"{what} {text!r} must be positive integers")
    return values


def model_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """Distinct (out, in) shapes of the linear layers inside the decoder layers, in order of appearance."""
    from ..structures.base import linear_weight
    from ..surgery import decoder_layers, is_linear

    _, blocks = decoder_layers(model)
    shapes = []
    for m in blocks.modules():
        if is_linear(m):
            shape = tuple(linear_weight(m).shape)
            if shape not in shapes:
                shapes.append(shape)
    return shapes


def median_time(calls: list, repeats: int, warmup: int, budget_s: float, done=lambda: None) -> tuple[float, int]:
    """Median seconds per call over repeats of one pass through `calls` (after warm-up passes).
    `done()` ends each pass (a GPU sync: the pass's queued work counts, one sync per pass).
    Repeats are cut to fit about budget_s, but never below 3."""
    for _ in range(warmup):
        for call in calls:
            call()
    done()
    times = []
    while len(times) < repeats:
        t = time.perf_counter()
        for call in calls:
            call()
        done()
        times.append((time.perf_counter() - t) / len(calls))
        if len(times) >= 3 and sum(times) * len(calls) > budget_s:
            break
    return statistics.median(times), len(times)


def cold_weights(nbytes: float, llc: int) -> int:
    """How many distinct weights of `nbytes` one cold pass rotates over: enough to read over twice the
    last-level cache `llc` (capped for tiny layers; `cold_bytes` in a result says what one pass read)."""
    return min(MAX_COLD_WEIGHTS, max(1, math.ceil(2 * llc / nbytes)))


def int8_weight_only(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of a dense weight in int8, symmetric, one scale per output row: the format
    of PyTorch's own int8 weight-only kernel (torch._weight_int8pack_mm, gpt-fast's int8), which
    computes x (codes * scales)^T."""
    scales = (weight.abs().amax(1) / 127).clamp_min(1e-12)
    return torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8), scales.to(weight.dtype)


def int8_dense_product(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """x (codes * scales)^T by torch._weight_int8pack_mm; None where this build or device has no such
    kernel. The caller keeps the inputs in 32s (structures.quantized.int8_decode_fits)."""
    try:
        return torch._weight_int8pack_mm(x, codes, scales)
    except (AttributeError, RuntimeError, NotImplementedError):
        return None


def int8_dense_calls(weight: torch.Tensor, x: torch.Tensor, llc: int) -> tuple[list, int]:
    """The calls of a cold int8 weight-only pass beside a dense (out, in) layer, and the bytes one call
    reads. Bfloat16 activations: PyTorch's CPU kernel vectorises them only (float32 measured 2.3-7.8x
    slower than the float32 dense layer), as gpt-fast's int8 runs. No calls where torch has no such
    kernel here or the inputs do not come in 32s (structures.quantized.int8_decode_fits)."""
    out_f, in_f = weight.shape
    x8 = x.to(torch.bfloat16)
    nbytes = out_f * in_f + out_f * x8.element_size()
    if not int8_decode_fits(in_f):
        return [], nbytes
    codes, scales = int8_weight_only(weight.detach())
    scales = scales.to(torch.bfloat16)
    if int8_dense_product(x8, codes, scales) is None:
        return [], nbytes
    # distinct weights for the cold pass: random codes, the same scales
    weights = [codes] + [torch.randint_like(codes, -127, 128) for _ in range(max(2, cold_weights(nbytes, llc)) - 1)]
    return [functools.partial(torch._weight_int8pack_mm, x8, w, scales) for w in weights], nbytes


def bench_layer(out_features: int, in_features: int, block_size: int, tokens: int, dtype=torch.float32,
                device="cpu", repeats: int = 30, warmup: int = 2, budget_s: float = 3.0, seed: int = 0,
                llc: int | None = None, spectra_bits: int = 32) -> dict:
    """One point: dense nn.Linear vs BlockCirculantLinear (spectra cached; spectra_bits 8: int8), hot and
    cold; beside them, cold, the dense layer in int8 weight-only (int8_weight_only: what a user would
    pick instead at a quarter of the bytes, with bfloat16 activations; None where torch has no such
    kernel here or the inputs do not come in 32s)."""
    torch.manual_seed(seed)
    cuda = torch.device(device).type == "cuda"
    llc = llc or (gpu_l2_bytes(device) if cuda else llc_bytes())
    dense_cost = costs.dense_costs(out_features, in_features, bytes_per_param=torch.tensor([], dtype=dtype).element_size())
    # int8 spectra: the codes are read where the fused kernel runs (few CPU rows); otherwise their float copy
    reads_codes = tokens <= circulant.KERNEL_MAX_ROWS and not cuda
    circ_cost = costs.circulant_costs(out_features, in_features, block_size,
                                      spectra_bits=spectra_bits if reads_codes else 32)
    n_dense, n_circ = cold_weights(dense_cost["bytes"], llc), cold_weights(circ_cost["bytes"], llc)
    dense = [nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype) for _ in range(n_dense)]
    circ = [BlockCirculantLinear(in_features, out_features, block_size, bias=False, device=device, dtype=dtype,
                                 spectra_bits=spectra_bits) for _ in range(n_circ)]
    x = torch.randn(tokens, in_features, device=device, dtype=dtype)
    int8_calls, int8_bytes = int8_dense_calls(dense[0].weight, x, llc)
    with torch.no_grad():
        for layer in circ:
            layer(x)  # spectra (and their int8 codes) built once, as at model load
    def calls(layers, n):
        return [functools.partial(layers[i % len(layers)], x) for i in range(n)]

    # GPU: kernels queue up; one sync per pass, and hot passes of 16 calls so the sync does not dominate
    hot, done = (16, functools.partial(sync, device)) if cuda else (1, lambda: None)
    with torch.inference_mode():  # (layers are built outside it: their caches check version counters)
        t_dense_hot, _ = median_time(calls(dense[:1], hot), repeats, warmup, budget_s, done)
        t_circ_hot, _ = median_time(calls(circ[:1], hot), repeats, warmup, budget_s, done)
        t_dense, r_dense = median_time(calls(dense, max(n_dense, 2)), repeats, 1, budget_s, done)
        t_circ, r_circ = median_time(calls(circ, n_circ), repeats, 1, budget_s, done)
        t_int8 = median_time(int8_calls, repeats, 1, budget_s, done)[0] if int8_calls else None
        fused_kernel = circulant.uses_kernel(x.float(), circ[0].spectra())  # the product computes in float32
    return {
        "shape": f"{out_features}x{in_features}", "out_features": out_features, "in_features": in_features,
        "block_size": block_size, "tokens": tokens, "dtype": str(dtype).replace("torch.", ""),
        "spectra_bits": spectra_bits,
        "dense_us": t_dense * 1e6, "circulant_us": t_circ * 1e6, "speedup": t_dense / t_circ,
        "dense_hot_us": t_dense_hot * 1e6, "circulant_hot_us": t_circ_hot * 1e6,
        "speedup_hot": t_dense_hot / t_circ_hot,
        "flop_ratio": dense_cost["flops"] / circ_cost["flops"], "byte_ratio": dense_cost["bytes"] / circ_cost["bytes"],
        "cold_weights": {"dense": n_dense, "circulant": n_circ},
        "cold_bytes": {"dense": n_dense * dense_cost["bytes"], "circulant": n_circ * circ_cost["bytes"]},
        "repeats": {"dense": r_dense, "circulant": r_circ},
        "llc_bytes": llc,
        # dense in int8 weight-only (torch._weight_int8pack_mm), cold; None: no such kernel here
        "int8_dense_us": t_int8 * 1e6 if t_int8 else None, "int8_dense_speedup": t_dense / t_int8 if t_int8 else None,
        "int8_dense_byte_ratio": dense_cost["bytes"] / int8_bytes if t_int8 else None,
        "int8_dense_activations": "bfloat16" if t_int8 else None,
        "decode_kernel": fused_kernel,  # whether the circulant side ran the fused CPU kernel (bcllm.kernel)
    }


def layer_table(rows: list[dict]) -> str:
    head = ("| shape | b | tokens | dense us | circulant us | speedup (cold) | speedup (hot) | FLOP ratio | byte ratio "
            "| int8 dense us | int8 dense speedup (cold) |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")

    def int8(r):
        return ("– | –" if r.get("int8_dense_us") is None else
                f"{r['int8_dense_us']:.1f} | {r['int8_dense_speedup']:.2f}x")
    return head + "".join(
        f"| {r['shape']} | {r['block_size']} | {r['tokens']} | {r['dense_us']:.1f} | {r['circulant_us']:.1f} | "
        f"{r['speedup']:.2f}x | {r['speedup_hot']:.2f}x | {r['flop_ratio']:.1f} | {r['byte_ratio']:.1f} | {int8(r)} |\n"
        for r in rows)


def param_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:  # tied embeddings count once
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def spectra_cache_bytes(model: nn.Module) -> int:
    """Bytes the spectra caches hold: float spectra, and for int8 spectra also their dequantised
    copy, codes and scales (circulant.quantized_spectra)."""
    tensors = [m._spectra for m in model.modules() if getattr(m, "_spectra", None) is not None]
    tensors += [t for m in model.modules() if getattr(m, "_quantized", None) is not None
                for t in (m._quantized[1], *m._quantized[2])]
    return sum(t.numel() * t.element_size() for t in tensors)


def lean_decode(model, ids: torch.Tensor, new_tokens: int, cache=None, step=None) -> tuple[float, torch.Tensor]:
    """(seconds, tokens) of new_tokens greedy steps after an untimed prefill: a static KV cache,
    positions and the next token written in place, logits of the last position only; per token
    nothing runs but the model call and an argmax.

    cache: a StaticCache to reuse (reset here; at least prompt + new_tokens long), else one is
    allocated. step: what runs each decode step, default the model itself; bench_model passes
    torch.compile(model), which keeps one graph for every step when the cache is reused (the
    prefill always runs eager: prompt lengths vary); its guards run on the first step only."""
    n = ids.shape[1]
    if cache is None:
        cache = static_cache(model, n + new_tokens)
    else:
        cache.reset()
    step = model if step is None else step  # (not `or`: a compiled module refuses bool())
    kw = {**cache_kwargs(model, cache), "logits_to_keep": 1}
    out = model(ids, cache_position=torch.arange(n, device=ids.device), **kw)
    token = out.logits[:, -1:].argmax(-1)
    tokens = torch.empty(ids.shape[0], new_tokens, dtype=torch.long, device=ids.device)
    position = torch.tensor([n], device=ids.device)
    sync(ids.device)  # the untimed prefill may still be running on a GPU
    t = time.perf_counter()
    with contextlib.ExitStack() as stance:
        for i in range(new_tokens):
            if i == 1 and step is not model:
                # A compiled step's first call checked its guards (and compiled if it had to); every
                # later one has the same inputs, so only the guards that tell cached graphs apart run
                # (about 1.5 ms a token on SmolLM2, for the dense model and the compressed one alike).
                stance.enter_context(torch.compiler.set_stance("default", skip_guard_eval_unsafe=True))
            tokens[:, i:i + 1] = token
            out = step(token, cache_position=position, **kw)
            token = out.logits[:, -1:].argmax(-1)
            position += 1
    sync(ids.device)
    return time.perf_counter() - t, tokens


def memory_bandwidth(device="cpu", mib: int = 512, repeats: int = 5) -> float:
    """Bytes/s of a large tensor copy (read + write counted), the best of `repeats`: the rate at
    which decode can stream weights, so the byte limit of a model is this over its weight bytes."""
    src = torch.ones(mib << 18, device=device)  # mib MiB of float32
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * src.element_size() / best


def generate_decode(model, ids: torch.Tensor, new_tokens: int) -> float:
    """Seconds of new_tokens greedy steps through Hugging Face generate (its default dynamic
    cache): generate(new_tokens + 1) minus generate(1), both including one prefill."""
    kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    sync(ids.device)
    first = time.perf_counter() - t
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, **kw)
    sync(ids.device)
    return max(time.perf_counter() - t - first, 1e-9)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def compile_steps(models: dict, prompt: torch.Tensor, caches: dict, cuda_graphs: bool = False
                  ) -> tuple[dict, dict, str | None]:
    """({name: torch.compile(model)}, {name: compile seconds}, None), or (the models, {}, why) where
    torch.compile fails here (no compiler, an unsupported op): the lean loop then runs eager.
    cuda_graphs: compile with mode="reduce-overhead", which replays each decode step as one CUDA
    graph (no per-kernel launch cost; the static cache's tensors keep their addresses, as graphs need)."""
    steps, seconds = {}, {}
    for name, m in models.items():
        t = time.perf_counter()
        try:
            steps[name] = torch.compile(m, dynamic=False, mode="reduce-overhead" if cuda_graphs else None)
            # traces and compiles the decode step (with graphs: warm-up, record, then a replay)
            lean_decode(m, prompt, 4 if cuda_graphs else 2, caches[name], steps[name])
        except Exception as e:  # noqa: BLE001 - any compile failure leaves the eager figures standing
            why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            warnings.warn(f"bcllm: torch.compile failed ({why}); the lean loop runs eager", RuntimeWarning)
            return dict(models), {}, why
        seconds[name] = time.perf_counter() - t
    return steps, seconds, None


def alternate(runs: dict, names: list[str], prompts: list, repeats: int, progress=None) -> dict:
    """{kind: {name: [seconds per repeat, summed over prompts]}}: run(name, ids) for each kind,
    each prompt on every model in turn before the next prompt."""
    seconds = {kind: {name: [] for name in names} for kind in runs}
    if progress is not None:
        progress.reset(total=repeats * len(runs))
    for _ in range(repeats):
        for kind, run in runs.items():
            totals = dict.fromkeys(names, 0.0)
            for ids in prompts:
                for name in names:
                    totals[name] += run(name, ids)
            for name, total in totals.items():
                seconds[kind][name].append(total)
            if progress is not None:
                progress.update(1)
    return seconds


def check_cuda_graphs(cuda_graphs: bool, device, compile: bool) -> None:
    """CUDA graphs replay compiled steps on a GPU: refuse them anywhere else (before a model loads)."""
    if cuda_graphs and (torch.device(device).type != "cuda" or not compile):
        raise InputError(f"CUDA graphs replay compiled decode steps on a GPU: use them with --device cuda and "
                         f"without --no-compile (the model is on {torch.device(device).type}"
                         f"{', compile is off' if not compile else ''})", "cuda_graphs")


BENCH_PROMPTS = 8  # bench model's prompts: the first this many of the file (--num-prompts)


@torch.inference_mode()
def bench_model(model: nn.Module, compressed: nn.Module, prompt_ids: list[list[int]], new_tokens: int = 32,
                repeats: int = 3, compile: bool = True, progress=None, cuda_graphs: bool = False) -> dict:
    """Prefill and decode throughput of both models, alternating prompt by prompt.

    Decode runs three ways: the lean loop with each step through torch.compile (`decode_*`; eager
    where compile is off or fails), the same loop eager (`eager_decode_*`), and Hugging Face
    generate (`generate_decode_*`). One static cache per model serves every prompt, so the
    compiled step has one shape. Each prompt runs on the dense model and right after on the
    compressed one (a shared machine's speed drifts over seconds; the pair sees the same), and
    each kind's per-repeat totals give medians over the repeats. cuda_graphs (a GPU, compile on):
    each compiled decode step is replayed as one CUDA graph (compile_steps)."""
    device = next(model.parameters()).device
    check_cuda_graphs(cuda_graphs, device, compile)
    prompts = [torch.tensor([ids], device=device) for ids in prompt_ids]
    models = {"dense": model, "compressed": compressed}
    max_len = max(len(ids) for ids in prompt_ids) + new_tokens
    caches = {name: static_cache(m, max_len) for name, m in models.items()}
    for name, m in models.items():  # warm-up: caches, allocator, spectra (built before any graph captures them)
        m(prompts[0])
        lean_decode(m, prompts[0], 2, caches[name])
    steps, compile_s, compile_error = compile_steps(models, prompts[0], caches, cuda_graphs) if compile else \
        (dict(models), {}, None)
    compiled = compile and compile_error is None
    # inductor falls back to plain launches where a step cannot be a graph, and only logs it
    graph_skips = int(torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]) if cuda_graphs else None

    def prefill_seconds(name, ids):
        t = time.perf_counter()
        models[name](ids, use_cache=True)
        sync(device)
        return time.perf_counter() - t

    runs = {"prefill": prefill_seconds,
            "decode": lambda name, ids: lean_decode(models[name], ids, new_tokens, caches[name], steps[name])[0],
            "eager": lambda name, ids: lean_decode(models[name], ids, new_tokens, caches[name])[0],
            "generate": lambda name, ids: generate_decode(models[name], ids, new_tokens)}
    if not compiled:
        del runs["eager"]  # the lean loop already ran eager
    seconds = alternate(runs, list(models), prompts, repeats, progress)
    prefill, decode, generate = seconds["prefill"], seconds["decode"], seconds["generate"]
    eager = seconds.get("eager", decode)
    n_prefill = sum(len(ids) for ids in prompt_ids)
    n_decode = new_tokens * len(prompts)
    # the headline decode figure says how it was made: compiled, or eager because compile failed
    result = {"compiled": compiled, "compile_seconds": compile_s, "compile_error": compile_error,
              "decode_mode": ("compiled, CUDA graphs" if cuda_graphs else "compiled") if compiled else
              "eager (torch.compile failed)" if compile_error else "eager",
              "decode_kernel": kernel.usage(), "cuda_graph_skips": graph_skips}
    for name in models:
        result[f"{name}_prefill_tokens_per_s"] = n_prefill / statistics.median(prefill[name])
        result[f"{name}_decode_tokens_per_s"] = n_decode / statistics.median(decode[name])
        result[f"{name}_eager_decode_tokens_per_s"] = n_decode / statistics.median(eager[name])
        result[f"{name}_generate_decode_tokens_per_s"] = n_decode / statistics.median(generate[name])
        result[f"{name}_param_bytes"] = param_bytes(models[name])
    _add_ratios(result, model, compressed, device)
    result.update(prompts=len(prompts), prefill_tokens=n_prefill, new_tokens=new_tokens, repeats=repeats,
                  raw_seconds={"prefill": prefill, "decode": decode, "eager_decode": eager,
                               "generate_decode": generate})
    return result


def _add_ratios(result: dict, model: nn.Module, compressed: nn.Module, device) -> None:
    """Speedups (compressed over dense) and the analytic limits beside them, into `result`."""
    result["compressed_spectra_cache_bytes"] = spectra_cache_bytes(compressed)
    result["memory_bytes_per_s"] = memory_bandwidth(device)
    # decode streams every weight once a token: the best tokens/s the memory allows
    result["dense_byte_limit_tokens_per_s"] = result["memory_bytes_per_s"] / result["dense_param_bytes"]
    for kind in ("prefill", "decode", "eager_decode", "generate_decode"):
        result[f"{kind}_speedup"] = (result[f"compressed_{kind}_tokens_per_s"]
                                     / result[f"dense_{kind}_tokens_per_s"])
    dense_cost, circ_cost = model_costs(model), model_costs(compressed)
    result["prefill_flop_ratio"] = dense_cost["flops"] / circ_cost["flops"]  # limit at large batch
    result["decode_byte_ratio"] = dense_cost["bytes"] / circ_cost["bytes"]   # limit at batch 1
    result["costs"] = {"dense": dense_cost, "compressed": circ_cost}


def model_table(r: dict) -> str:
    lean = "decode tokens/s, lean loop" + (" (torch.compile)" if r.get("compiled") else "")
    rows = [("prefill tokens/s", "prefill", f"{r['prefill_flop_ratio']:.2f}x (FLOPs)"),
            (lean, "decode", f"{r['decode_byte_ratio']:.2f}x (bytes)")]
    if r.get("compiled"):
        rows.append(("decode tokens/s, lean loop eager", "eager_decode", ""))
    rows.append(("decode tokens/s, HF generate", "generate_decode", ""))
    text = "| | dense | compressed | ratio | analytic limit |\n| --- | ---: | ---: | ---: | ---: |\n"
    for label, kind, limit in rows:
        text += (f"| {label} | {r[f'dense_{kind}_tokens_per_s']:.1f} | {r[f'compressed_{kind}_tokens_per_s']:.1f} | "
                 f"{r[f'{kind}_speedup']:.2f}x | {limit} |\n")
    if r.get("cuda_graph_skips"):
        text += f"| CUDA graphs skipped {r['cuda_graph_skips']} time(s) (inductor ran those steps without one) | | | | |\n"
    if r.get("compile_error"):
        text += f"| torch.compile failed ({r['compile_error'][:120]}): every decode figure is eager | | | | |\n"
    return text + (f"| dense decode limit (memory {r['memory_bytes_per_s'] / 1e9:.1f} GB/s over the weights) | "
                   f"{r['dense_byte_limit_tokens_per_s']:.1f} | | | |\n"
                   f"| parameter MiB | {r['dense_param_bytes'] / 2**20:.1f} | {r['compressed_param_bytes'] / 2**20:.1f} | "
                   f"{r['dense_param_bytes'] / r['compressed_param_bytes']:.2f}x | |\n")


def header_lines(versions: dict) -> str:
    return (f"CPU: {versions.get('cpu')}, threads: {versions.get('threads')}, torch {versions.get('torch')}, "
            f"transformers {versions.get('transformers')}, bcllm {versions.get('bcllm')}"
            + (f", GPU: {versions['gpu']}" if "gpu" in versions else "") + "\n\n")
