"""Dequantize GGML tensors (the block formats inside GGUF files) to float32.

Q8_0 has a vectorised path here (the embedding of Gemma 3 is 178 MB of it, and gguf's generic
path is several times slower); every other type goes through `gguf.quants`, whose Python
implementation gguf-py tests against the C library.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from ..errors import UnsupportedModelError

SUPPORTED_TYPES = frozenset({
    GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1,
    GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q4_K,
    GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K,
})

_ROWS_PER_CHUNK = 8192  # bound the temporary memory of dequantizing a huge tensor


def stored_nbytes(qtype: GGMLQuantizationType, n_elements: int) -> int:
    """Bytes a tensor of `n_elements` takes on disk in `qtype`."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return n_elements // block_size * type_size


def _dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    """Q8_0: blocks of 32 int8 with one float16 scale (34 bytes)."""
    raw = np.ascontiguousarray(blocks).reshape(-1, 34)
    scales = raw[:, :2].copy().view(np.float16).astype(np.float32)
    values = raw[:, 2:].view(np.int8).astype(np.float32)
    return values * scales


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType,
               shape: tuple[int, ...]) -> np.ndarray:
    """Float32 array of `shape` (numpy order, rows last-dim contiguous) from raw GGML bytes."""
    if qtype not in SUPPORTED_TYPES:
        raise UnsupportedModelError(f"unsupported GGML tensor type {qtype.name}")
    raw_bytes = np.asarray(data).view(np.uint8)
    if qtype == GGMLQuantizationType.F32:
        return raw_bytes.view(np.float32).reshape(shape).copy()
    if qtype == GGMLQuantizationType.F16:
        return raw_bytes.view(np.float16).astype(np.float32).reshape(shape)
    if qtype == GGMLQuantizationType.BF16:
        widened = raw_bytes.view(np.uint16).astype(np.uint32) << 16
        return widened.view(np.float32).reshape(shape)
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    raw = raw_bytes.reshape(rows, -1)
    out = np.empty((rows, shape[-1]), dtype=np.float32)
    for start in range(0, rows, _ROWS_PER_CHUNK):
        chunk = raw[start:start + _ROWS_PER_CHUNK]
        if qtype == GGMLQuantizationType.Q8_0:
            values = _dequantize_q8_0(chunk)
        else:
            values = gguf_dequantize(np.ascontiguousarray(chunk), qtype)
        out[start:start + len(chunk)] = values.reshape(len(chunk), shape[-1])
    return out.reshape(shape)
