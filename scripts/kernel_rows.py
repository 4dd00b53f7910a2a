"""Where the fused kernel stops paying: kernel vs planar torch path at 1-16 rows, cold (a ring
of distinct spectra, each call a new one), median microseconds. Sets circulant.KERNEL_MAX_ROWS.

    python scripts/kernel_rows.py
"""

import time

import torch
from bcllm.ops import circulant
from bcllm.ops import kernel


def median_us(call, n=400):
    for _ in range(20):
        call()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return sorted(times)[n // 2] * 1e6


if kernel.load() is None:
    raise SystemExit("the kernel is not built here (bcllm kernel says why)")
torch.manual_seed(0)
with torch.inference_mode():
    for out_f, in_f, b, count in [(1536, 576, 16, 600), (576, 1536, 16, 600), (11008, 4096, 64, 60)]:
        p, q = circulant.grid_shape(out_f, in_f, b)
        specs = [circulant.spectra(torch.randn(p, q, b)) for _ in range(count)]
        threads = circulant.kernel_threads(specs[0])  # as circulant_matmul dispatches
        for n in (1, 2, 4, 8, 16):
            x, ring = torch.randn(n, in_f), iter(range(10 ** 9))
            fused = median_us(lambda: kernel.circulant_decode(x, specs[next(ring) % count], out_f, in_f, b, threads))
            planar = median_us(lambda: circulant.circulant_matmul_planar(x, specs[next(ring) % count], out_f, in_f, b))
            print(f"{out_f}x{in_f} b={b} rows {n:2d}: kernel {fused:6.0f} us, planar {planar:6.0f} us", flush=True)
