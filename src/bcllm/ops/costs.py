"""Analytic cost model: FLOPs and weight bytes per token, per layer and per model.

What it counts (docs/DESIGN.md section 4): the linear layers only, per input token.
A dense layer does 2*out*in FLOPs and reads out*in weights in the parameter dtype.
A block-circulant layer (p x q blocks of size b, F = ceil(b/2) stored frequencies) does an
rfft of its q input blocks and an irfft of its p output blocks (2.5 b log2 b real
FLOPs each, half a complex FFT) and F*q*p complex multiply-adds (8 real FLOPs each),
and reads its cached planar float32 spectra (real and imaginary parts, the Nyquist frequency
folded into frequency 0 for even b): 8*F*q*p bytes, 4*b*q*p for even b, whatever the model dtype.
Norms, attention over the KV cache, embeddings and activations are not counted, so a
measured model ratio sits below these limits. At batch 1 a layer is bound by its
bytes (the decode limit is the byte ratio); at large batch by its FLOPs.
"""

from __future__ import annotations

import math

from .circulant import stored_frequencies


def dense_costs(out_features: int, in_features: int, bias: bool = False, bytes_per_param: int = 4) -> dict:
    params = out_features * in_features + (out_features if bias else 0)
    return {"flops": 2 * out_features * in_features + (out_features if bias else 0),
            "bytes": params * bytes_per_param, "params": params}


def circulant_costs(out_features: int, in_features: int, block_size: int, bias: bool = False,
                    bytes_per_param: int = 4, outputs: int = 1, spectra_bits: int = 32) -> dict:
    """`outputs` > 1: that many layers of this shape sharing one input transform (fused gate/up).
    spectra_bits 8: int8 spectra plus a float32 scale per frequency and output block."""
    b = block_size
    p, q = math.ceil(out_features / b), math.ceil(in_features / b)
    F = stored_frequencies(b)
    fft = 2.5 * b * math.log2(b) if b > 1 else 0.0
    bias_n = out_features * outputs if bias else 0
    flops = 8 * F * q * p * outputs + fft * (q + p * outputs) + bias_n
    spectra = 2 * F * q * p * outputs * spectra_bits // 8 + (4 * F * p * outputs if spectra_bits != 32 else 0)
    return {"flops": flops, "bytes": spectra + bias_n * bytes_per_param,
            "params": (p * q * b + (out_features if bias else 0)) * outputs}
