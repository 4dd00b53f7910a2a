"""The layer-bench sweep (`bcllm bench layer`): every shape x block size x token count, timed."""

from __future__ import annotations

import itertools

from tqdm import tqdm

from ..errors import InputError
from ..io.models import load_model, resolve_dtype
from .measure import DEFAULT_TOKENS, EXTRA_SHAPES, bench_layer, model_shapes


def bench_layers(shapes: list[tuple[int, int]] | None, block_sizes: list[int], tokens: list[int] | None = None, *,
                 model_id: str | None = None, dtype: str = "float32", device: str = "cpu", repeats: int = 30,
                 seed: int = 0, spectra_bits: int = 32) -> list[dict]:
    """bench_layer at every (shape, block size, tokens) point whose block size fits the shape.
    shapes None: the projection shapes of `model_id`, then the two large reference shapes."""
    tokens = list(tokens or DEFAULT_TOKENS)
    if shapes is None:
        model, _ = load_model(model_id, dtype=dtype)
        shapes = model_shapes(model)
        del model
        shapes += [s for s in EXTRA_SHAPES if s not in shapes]
    points = [(s, b, n) for s, b, n in itertools.product(shapes, block_sizes, tokens) if b <= min(s)]
    if not points:
        raise InputError(f"every block size {block_sizes} exceeds the smaller dimension of every shape")
    return [bench_layer(out_f, in_f, b, n, dtype=resolve_dtype(dtype), device=device, repeats=repeats, seed=seed,
                        spectra_bits=spectra_bits)
            for (out_f, in_f), b, n in tqdm(points, desc="bench layer", unit="point")]
