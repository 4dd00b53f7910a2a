"""Where a decode step's time goes: SmolLM2-135M dense, with all 90 MLP projections at block size
16 (fused), and the floor (every MLP removed: what the layers both models share cost), each step
through torch.compile as in `bcllm bench model`, prompt by prompt in turn (bench.alternate).
Then the torch profiler's table over 16 compiled steps of the compressed model (it inflates
small items; its bcllm::circulant_decode row is the kernel).

    python scripts/profile_decode.py > docs/results/bench/profile_decode.txt
"""

import copy
import statistics

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from bcllm import CirculantConfig, compress_
from bcllm.bench.measure import alternate, compile_steps, lean_decode, static_cache
from bcllm.structures import fuse_circulant_mlp_
from bcllm.io.models import load_model
from bcllm.io.prompts import load_prompts, tokenize_prompts


class NoMLP(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


model, tok = load_model("smollm2-135m")
student = copy.deepcopy(model)
compress_(student, CirculantConfig(block_size=16, targets="mlp"))
fuse_circulant_mlp_(student)
floor = copy.deepcopy(model)
for layer in floor.model.layers:
    layer.mlp = NoMLP()
models = {"dense": model, "compressed": student, "floor (no MLP)": floor}
prompts = [torch.tensor([ids]) for ids in tokenize_prompts(tok, load_prompts(None)[:8])]
new_tokens = 32
print("`python scripts/profile_decode.py` (2-core Xeon VM): ms per token, compiled lean loop, 8 prompts x "
      f"{new_tokens} tokens, the three models alternated prompt by prompt, 4 repeats\n")
with torch.inference_mode():
    caches = {name: static_cache(m, max(p.shape[1] for p in prompts) + new_tokens) for name, m in models.items()}
    for name, m in models.items():
        lean_decode(m, prompts[0], 2, caches[name])
    steps, _, error = compile_steps(models, prompts[0], caches)
    if error:
        raise SystemExit(f"torch.compile failed: {error}")
    run = {"decode": lambda name, ids: lean_decode(models[name], ids, new_tokens, caches[name], steps[name])[0]}
    seconds = alternate(run, list(models), prompts, repeats=4)["decode"]
    ms = {name: [s / (new_tokens * len(prompts)) * 1e3 for s in v] for name, v in seconds.items()}
    for name, v in ms.items():
        print(f"{name}: {[round(x, 1) for x in v]}, median {statistics.median(v):.2f} ms")
    mlp = {name: statistics.median(ms[name]) - statistics.median(ms["floor (no MLP)"]) for name in ("dense", "compressed")}
    print(f"MLPs in context (model minus floor): dense {mlp['dense']:.2f} ms, compressed {mlp['compressed']:.2f} ms\n")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        lean_decode(student, prompts[0], 16, caches["compressed"], steps["compressed"])
    print("compressed, 16 compiled steps under the profiler:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
