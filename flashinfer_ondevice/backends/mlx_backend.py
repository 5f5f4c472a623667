"""The `mlx` backend: int8/int4 matrix products on MLX (Metal on Apple silicon, CUDA on NVIDIA).

Our grouped codecs map onto MLX's affine quantization with no re-quantization: the int4
nibbles (low first, stored +8) read as uint32 words are MLX's 4-bit layout with bias
-8 * scale; int8 values XOR 0x80 are its 8-bit layout with bias -128 * scale. Resident
matrices are converted once at load (`prepare`); streamed rows are converted per product.
Other codecs, attention and norms run in numpy (the base class) for now. MLX's x86 CPU
kernels are slow: there it is for tests only.
"""

from __future__ import annotations

import importlib.util

import numpy as np

from ..quant.codecs import Codec
from ..quant.kernels import GROUP
from .base import Backend, Prepared

_OFFSET = {"int4": (4, 8), "int8": (8, 128)}  # codec -> (bits, stored offset)


def _installed() -> bool:
    """Whether MLX can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("mlx.core") is not None
    except ModuleNotFoundError:  # no mlx package at all
        return False


class _MlxMatrix:
    """A grouped-codec matrix as MLX arrays; apply(x) = x @ W.T."""

    def __init__(self, codec: Codec, raw: np.ndarray, cols: int):
        import mlx.core as mx
        bits, offset = _OFFSET[codec.name]
        groups = cols // GROUP
        scales = np.ascontiguousarray(raw[:, :4 * groups]).view(np.float32)
        payload = raw[:, 4 * groups:]
        if bits == 8:
            payload = payload ^ np.uint8(0x80)
        self.bits = bits
        self.weights = mx.array(np.ascontiguousarray(payload).view(np.uint32))
        self.scales = mx.array(scales)
        self.biases = mx.array(-offset * scales)
        self.rows = len(raw)
        self.nbytes = raw.nbytes + scales.nbytes  # the biases are one more float per group

    def apply(self, x: np.ndarray) -> np.ndarray:
        import mlx.core as mx
        y = mx.quantized_matmul(mx.array(x), self.weights, self.scales, self.biases,
                                transpose=True, group_size=GROUP, bits=self.bits)
        return np.array(y, copy=False)


class MlxBackend(Backend):
    """Grouped-codec products on MLX; everything else in numpy (the base class). Runs
    without a memory budget only: the planner does not count MLX's copies yet."""

    name = "mlx"
    install_hint = "pip install mlx (Apple silicon), mlx[cuda] (NVIDIA) or mlx[cpu]"

    @classmethod
    def installed(cls) -> bool:
        return _installed()

    def prepare(self, codec: Codec, raw: np.ndarray, cols: int) -> Prepared | None:
        if codec.name not in _OFFSET or not codec.supports(cols):
            return None
        return _MlxMatrix(codec, raw, cols)

    def matvec(self, codec: Codec, raw: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
        if codec.name in _OFFSET:
            out[:] = _MlxMatrix(codec, raw, len(x)).apply(x[None])[0]
        else:
            super().matvec(codec, raw, x, out)

    def matmul(self, codec: Codec, raw: np.ndarray, x: np.ndarray) -> np.ndarray:
        if codec.name in _OFFSET:
            return _MlxMatrix(codec, raw, x.shape[1]).apply(x)
        return super().matmul(codec, raw, x)
