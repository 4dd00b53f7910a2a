"""Where a decode step's time goes: SmolLM2-135M dense and with all 90 MLP projections at block
size 16 (fused), each step through torch.compile as in `bcllm bench model`; eager and compiled ms
per token, then the torch profiler's table over 16 compiled steps, and the time spent inside the
circulant kernel per token, timed around each call without the profiler.

    python scripts/profile_decode.py > docs/results/bench/profile_decode.txt
"""

import copy
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bcllm import CirculantConfig, compress_, kernel
from bcllm.bench import lean_decode, static_cache
from bcllm.fused import fuse_circulant_mlp_
from bcllm.models import load_model

model, tok = load_model("smollm2-135m")
student = copy.deepcopy(model)
compress_(student, CirculantConfig(block_size=16, targets="mlp"))
fuse_circulant_mlp_(student)
ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog and then")["input_ids"]])
inside = {"s": 0.0, "calls": 0}
direct = kernel.circulant_decode


def timed_kernel(*args):
    t = time.perf_counter()
    y = direct(*args)
    inside["s"] += time.perf_counter() - t
    inside["calls"] += 1
    return y


with torch.inference_mode():
    for name, m in (("dense", model), ("compressed", student)):
        cache = static_cache(m, 64)
        lean_decode(m, ids, 2, cache)
        step = torch.compile(m, dynamic=False)
        t = time.perf_counter()
        lean_decode(m, ids, 2, cache, step)
        print(f"{name}: compiled in {time.perf_counter() - t:.0f} s", flush=True)
        eager = [lean_decode(m, ids, 32, cache)[0] / 32 * 1e3 for _ in range(3)]
        compiled = [lean_decode(m, ids, 32, cache, step)[0] / 32 * 1e3 for _ in range(3)]
        print(f"{name}: ms per token, eager {[round(v, 1) for v in eager]}, compiled "
              f"{[round(v, 1) for v in compiled]}", flush=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            lean_decode(m, ids, 16, cache, step)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
        if name == "compressed":
            kernel.circulant_decode = timed_kernel  # what the compiled graph's operator calls
            seconds, _ = lean_decode(m, ids, 32, cache, step)
            kernel.circulant_decode = direct
            print(f"compressed: step {seconds / 32 * 1e3:.1f} ms, of which {inside['s'] / 32 * 1e3:.2f} ms in "
                  f"{inside['calls'] // 32} kernel calls ({inside['s'] / inside['calls'] * 1e6:.0f} us a call)")
