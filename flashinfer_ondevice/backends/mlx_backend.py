"""The `mlx` backend: int8/int4 matrix products on MLX (Metal on Apple silicon, CUDA on NVIDIA).

Our grouped codecs map onto MLX's affine quantization with no re-quantization: the int4
nibbles (low first, stored +8) read as uint32 words are MLX's 4-bit layout with bias
-8 * scale; int8 values XOR 0x80 are its 8-bit layout with bias -128 * scale. Only the
layout differs: a store row is [scales | payload], MLX wants payload, scales and biases as
three arrays, so every product from codec bytes is one conversion copy.

Where the converted arrays live (measured with MLX 0.32 on its CPU device, by
mx.get_active_memory/get_peak_memory): `mx.array(numpy)` always copies, but
`np.array(mx_array, copy=False)` is a writable view of the MLX array's own memory, and
`mx.quantized_matmul` on a reshaped prefix of an evaluated array allocates only its output.
So conversions write through numpy views straight into MLX-owned arrays: resident matrices
into their own (`prepare`, `prepare_ffn`: the backend's device form, which the planner
places under --gpu-memory-budget), streamed rows and rows kept in DRAM as codec bytes into
one preallocated `_Staging` of STAGE_BYTES, a block of rows at a time; no product allocates
but its output (and its input's copy). Other codecs, attention and norms run in numpy (the
base class). MLX's x86 CPU kernels are slow: there it is for tests only.
"""

from __future__ import annotations

import importlib.util

import numpy as np

from ..functional import ACTIVATIONS
from ..quant.codecs import Codec
from ..quant.kernels import GROUP
from .base import Backend, Prepared

_OFFSET = {"int4": (4, 8), "int4fit": (4, 8), "int8": (8, 128)}  # codec -> (bits, stored
# offset); int4fit holds int4's bytes
STAGE_BYTES = 4 << 20  # codec bytes converted for MLX at a time (streamed or DRAM rows)
_SCALE_SHARE = 4 + GROUP * min(bits for bits, _ in _OFFSET.values()) // 8  # codec bytes per
# scale in the codec where scales take the largest share (int4: 4 of every 36)


def _installed() -> bool:
    """Whether MLX can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("mlx.core") is not None
    except ModuleNotFoundError:  # no mlx package at all
        return False


def _arrays(payload_nbytes: int, n_scales: int) -> tuple:
    """MLX arrays (payload as uint32, scales, biases), evaluated, and writable numpy views of
    them (payload and scales as bytes, biases as float32)."""
    import mlx.core as mx
    arrays = (mx.zeros((payload_nbytes // 4,), mx.uint32), mx.zeros((n_scales,), mx.float32),
              mx.zeros((n_scales,), mx.float32))
    mx.eval(*arrays)
    payload, scales, biases = (np.array(a, copy=False) for a in arrays)
    return arrays, (payload.view(np.uint8), scales.view(np.uint8), biases)


def _convert(codec: Codec, raw: np.ndarray, cols: int, views: tuple) -> None:
    """Write the (n, row_nbytes) codec bytes `raw` into the front of `views` (see _arrays)
    in MLX's layout, allocating nothing."""
    bits, offset = _OFFSET[codec.name]
    n, groups = len(raw), cols // GROUP
    payload, scales, biases = views
    np.copyto(scales[:4 * n * groups].reshape(n, 4 * groups), raw[:, :4 * groups])
    packed = payload[:n * cols * bits // 8].reshape(n, -1)
    if bits == 8:
        np.bitwise_xor(raw[:, 4 * groups:], np.uint8(0x80), out=packed)
    else:
        np.copyto(packed, raw[:, 4 * groups:])
    np.multiply(scales[:4 * n * groups].view(np.float32), np.float32(-offset),
                out=biases[:n * groups])


def _product(x, arrays: tuple, rows: int, cols: int, bits: int, transpose: bool = True):
    """x @ W.T (or x @ W) with W the first `rows` rows of `arrays` (see _arrays), an MLX
    array (lazy)."""
    import mlx.core as mx
    weights, scales, biases = arrays
    groups = cols // GROUP
    return mx.quantized_matmul(x, weights[:rows * cols * bits // 32].reshape(rows, -1),
                               scales[:rows * groups].reshape(rows, groups),
                               biases[:rows * groups].reshape(rows, groups),
                               transpose=transpose, group_size=GROUP, bits=bits)


def device_nbytes(codec: Codec, rows: int, cols: int) -> int | None:
    """Bytes a rows x cols matrix holds in MLX's form: its codec bytes (payload and scales)
    and one bias per scale; None for what MLX does not multiply."""
    if codec.name not in _OFFSET or not codec.supports(cols):
        return None
    return rows * codec.row_nbytes(cols) + 4 * rows * (cols // GROUP)


class _MlxMatrix:
    """A grouped-codec matrix as MLX arrays of its own; apply(x) = x @ W.T."""

    def __init__(self, codec: Codec, raw: np.ndarray, cols: int):
        self.bits = _OFFSET[codec.name][0]
        self.rows, self.cols = len(raw), cols
        self.nbytes = device_nbytes(codec, self.rows, cols)
        self.arrays, views = _arrays(self.rows * cols * self.bits // 8,
                                     self.rows * (cols // GROUP))
        _convert(codec, raw, cols, views)

    def product(self, x, transpose: bool = True):
        return _product(x, self.arrays, self.rows, self.cols, self.bits, transpose)

    def apply(self, x: np.ndarray) -> np.ndarray:
        import mlx.core as mx
        return np.array(self.product(mx.array(x)), copy=False)


def _activation(name: str, g):
    """The architecture's activation on an MLX array, as functional.ACTIVATIONS computes it."""
    import mlx.core as mx
    if name == "silu":
        return g / (1.0 + mx.exp(-g))
    return 0.5 * g * (1.0 + mx.tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))


class _MlxFFN:
    """A dense FFN of row-column bundles as three MLX matrices (gate, up: x @ W.T; the down
    columns: h @ W), computed in MLX end to end."""

    def __init__(self, codec: Codec, raw: np.ndarray, hidden: int, activation: str):
        rb = codec.row_nbytes(hidden)
        self.parts = [_MlxMatrix(codec, raw[:, i * rb:(i + 1) * rb], hidden) for i in range(3)]
        self.activation = activation
        self.nbytes = sum(p.nbytes for p in self.parts)

    def apply(self, x: np.ndarray) -> np.ndarray:
        import mlx.core as mx
        gate, up, down = self.parts
        xm = mx.array(x)
        h = _activation(self.activation, gate.product(xm)) * up.product(xm)
        return np.array(down.product(h, transpose=False), copy=False)


class _Staging:
    """One preallocated set of MLX arrays that codec bytes are converted into before a
    product, up to `capacity` codec bytes at a time."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.arrays, self.views = _arrays(capacity, capacity // _SCALE_SHARE)

    @staticmethod
    def planned_nbytes(capacity: int) -> int:
        return capacity - capacity % 4 + 8 * (capacity // _SCALE_SHARE)  # as _arrays

    def matmul(self, codec: Codec, raw: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
        """out = x @ decode(raw).T, a block of rows at a time."""
        import mlx.core as mx
        cols = x.shape[1]
        bits = _OFFSET[codec.name][0]
        block = max(1, self.capacity // codec.row_nbytes(cols))
        xm = mx.array(x)
        for start in range(0, len(raw), block):
            end = min(start + block, len(raw))
            _convert(codec, raw[start:end], cols, self.views)
            # np.array forces the product before the next block overwrites the staging
            out[:, start:end] = np.array(_product(xm, self.arrays, end - start, cols, bits),
                                         copy=False)


class MlxBackend(Backend):
    """Grouped-codec products on MLX; everything else in numpy (the base class)."""

    name = "mlx"
    install_hint = "pip install mlx (Apple silicon), mlx[cuda] (NVIDIA) or mlx[cpu]"
    device_tier = True

    def __init__(self, threads: int | None = None):
        super().__init__(threads)
        import mlx.core  # noqa: F401  imported before any plan measures the process's memory
        self._staging: _Staging | None = None

    @classmethod
    def installed(cls) -> bool:
        return _installed()

    @property
    def device_shares_host(self) -> bool:
        """Whether MLX's arrays live in the process's own memory: on its CPU device and on
        Apple silicon's unified memory; not on a CUDA GPU."""
        import mlx.core as mx
        return not (mx.cuda.is_available() and mx.default_device() == mx.gpu)

    def device_nbytes(self, codec: Codec, rows: int, cols: int) -> int | None:
        return device_nbytes(codec, rows, cols)

    def ffn_device_nbytes(self, codec: Codec, rows: int, hidden: int) -> int | None:
        part = device_nbytes(codec, rows, hidden)
        return None if part is None else 3 * part

    def staging_nbytes(self, largest: int) -> int:
        return _Staging.planned_nbytes(min(STAGE_BYTES, largest))

    def reserve_staging(self, largest: int) -> int:
        """Allocate the staging (once) and stop MLX's allocator from keeping freed buffers
        for reuse (it would hold every product's output: memory no plan counts)."""
        import mlx.core as mx
        if self._staging is None:
            mx.set_cache_limit(0)
            self._staging = _Staging(min(STAGE_BYTES, largest))
        return _Staging.planned_nbytes(self._staging.capacity)

    def prepares(self, codec: Codec, cols: int) -> bool:
        return device_nbytes(codec, 1, cols) is not None

    def prepares_ffn(self, codec: Codec, hidden: int, neurons: int) -> bool:
        return self.prepares(codec, hidden)

    def prepare(self, codec: Codec, raw: np.ndarray, cols: int,
                alone: bool = False) -> Prepared | None:
        if not self.prepares(codec, cols):
            return None
        return _MlxMatrix(codec, raw, cols)

    def prepare_ffn(self, codec: Codec, raw: np.ndarray, hidden: int, activation: str,
                    alone: bool = False, down_rows: np.ndarray | None = None
                    ) -> Prepared | None:
        # MLX multiplies by the bundles' down columns as they are (no re-encoding)
        if not self.prepares_ffn(codec, hidden, len(raw)) or activation not in ACTIVATIONS:
            return None
        return _MlxFFN(codec, raw, hidden, activation)

    def _staged(self) -> _Staging:
        """The staging; allocated at the first product where no plan reserved it."""
        if self._staging is None:
            self.reserve_staging(STAGE_BYTES)
        return self._staging

    def matvec(self, codec: Codec, raw: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
        if codec.name in _OFFSET:
            self._staged().matmul(codec, raw, x[None], out[None])
        else:
            super().matvec(codec, raw, x, out)

    def matmul(self, codec: Codec, raw: np.ndarray, x: np.ndarray) -> np.ndarray:
        if codec.name not in _OFFSET:
            return super().matmul(codec, raw, x)
        out = np.empty((len(x), len(raw)), np.float32)
        self._staged().matmul(codec, raw, x, out)
        return out
