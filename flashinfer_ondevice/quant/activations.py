"""Round activations the way llama.cpp's CPU kernels do before a quantized dot product.

llama.cpp multiplies a quantized weight by an activation that it first quantizes itself: to
Q8_0 (blocks of 32, fp16 scale) for Q4_0/Q5_0/Q8_0-family weights, to Q8_K (blocks of 256, f32
scale) for K-quants, to fp16 for F16 weights. Reproducing that rounding ("fake quantization":
quantize, then dequantize to float) makes our float matmul compute the same numbers, so logits
agree with llama.cpp's far more closely than float activations would (see the tests). Weights
from float sources (F32, or our own codecs later) use no activation rounding.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

_Q8_0_INPUT = {T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0}
_Q8_K_INPUT = {T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K}


def input_format_for(qtype: T) -> str | None:
    """The activation format llama.cpp's CPU backend uses against weights of `qtype`."""
    if qtype in _Q8_0_INPUT:
        return "q8_0"
    if qtype in _Q8_K_INPUT:
        return "q8_k"
    if qtype == T.F16:
        return "f16"
    if qtype == T.BF16:
        return "bf16"
    return None


def _blocks(x: np.ndarray, size: int) -> np.ndarray:
    return x.reshape(*x.shape[:-1], x.shape[-1] // size, size)


def fake_q8_0(x: np.ndarray) -> np.ndarray:
    """Q8_0 as ggml's x86 kernel: id = 127/amax, round half to even, scale stored as fp16."""
    b = _blocks(x.astype(np.float32, copy=False), 32)
    amax = np.abs(b).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127.0) / amax, np.float32(0.0))
    q = np.rint(b * inv)
    scale = (amax / np.float32(127.0)).astype(np.float16).astype(np.float32)
    return (q * scale).reshape(x.shape)


def fake_q8_k(x: np.ndarray) -> np.ndarray:
    """Q8_K as ggml's reference: iscale = -127/max (signed extreme), q <= 127, d = 1/iscale."""
    b = _blocks(x.astype(np.float32, copy=False), 256)
    idx = np.abs(b).argmax(axis=-1)[..., None]
    extreme = np.take_along_axis(b, idx, axis=-1)
    with np.errstate(divide="ignore"):
        iscale = np.where(extreme != 0, np.float32(-127.0) / extreme, np.float32(0.0))
        scale = np.where(iscale != 0, np.float32(1.0) / iscale, np.float32(0.0))
    q = np.minimum(np.rint(b * iscale), 127)
    return (q * scale.astype(np.float32)).reshape(x.shape)


def _fake_bf16(x: np.ndarray) -> np.ndarray:
    bits = x.astype(np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # round to nearest even
    return rounded.astype(np.uint32).view(np.float32)


ROUNDERS = {
    "q8_0": fake_q8_0,
    "q8_k": fake_q8_k,
    "f16": lambda x: x.astype(np.float16).astype(np.float32),
    "bf16": _fake_bf16,
}
