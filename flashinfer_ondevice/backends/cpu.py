"""The `cpu` backend: the fast path on x86 and ARM CPUs.

One token runs the codec's fused numba kernels straight from its bytes (quant/kernels.py,
quant/palette_kernels.py), which suit streamed rows and sparse neurons: nothing is prepared.
Attention of a decode step reads the KV cache where it is stored (attention_kernels.py).
Resident int8/int4 matrices and dense FFNs are prepared once into onnxruntime's MatMulNBits
(backends/onnx_matmul.py) where it is installed and `prepare_resident` is on: measured 2-3x
faster than the numba kernels per token and 5-10x for prefill on this project's shapes
(docs/benchmarks.md), at the price of int8 activations. Several tokens otherwise decode
blocks of rows to float32 and multiply with BLAS (the base class).
"""

from __future__ import annotations

import time

import numpy as np

from ..kv_cache import KVEntries
from ..quant.codecs import Codec
from . import attention_kernels, cpu_kernels, onnx_matmul
from .base import Backend, Prepared
from .kernel_choice import KernelChoice

DECODE_QUERIES = 4  # queries up to which attention runs in the numba kernel; more (prefill)
# run the base class's blocked BLAS form
PARALLEL_ENTRIES = 2 * attention_kernels.CHUNK  # cache entries (x kv heads) from which that
# kernel may use every thread: serial or parallel chosen by what each costs now, separately
# for each power-of-two size of the work (backends/kernel_choice.py)


class CpuBackend(Backend):
    """numba kernels on codec bytes; onnxruntime for what is prepared (see the module)."""

    name = "cpu"

    def __init__(self, threads: int | None = None):
        super().__init__(threads)
        self.prepare_resident = onnx_matmul.installed()
        # long contexts: all threads when the machine is idle, one when it is busy
        self._attention_choices: dict[int, KernelChoice] = {}  # by size of the work

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        """The compiled norm (one way for any number of rows, so prefill and decode round
        alike) on float32; numpy's otherwise."""
        if x.dtype != np.float32 or weight.dtype != np.float32:
            return super().rms_norm(x, weight, eps)
        rows = np.ascontiguousarray(x.reshape(-1, x.shape[-1]))
        out = np.empty_like(rows)
        cpu_kernels.rms_norm_rows(rows, weight, eps, out)
        return out.reshape(x.shape)

    def attention(self, q: np.ndarray, kv: KVEntries, q_positions: np.ndarray,
                  window: int | None, f16_probabilities: bool,
                  lse: np.ndarray | None = None) -> np.ndarray:
        """Decode reads the cache in place in the numba kernel (attention_kernels.py)."""
        kv_heads, group, n_tokens, head_dim = q.shape
        if n_tokens > DECODE_QUERIES:
            return super().attention(q, kv, q_positions, window, f16_probabilities, lse)
        keys, values = kv.keys, kv.values
        if keys.dtype == np.float16:  # numba reads float16 as its bits
            keys, values = keys.view(np.uint16), values.view(np.uint16)
        serial, parallel = attention_kernels.kernels(kv.cache_type)
        entries = kv_heads * kv.n
        choice = None if entries < PARALLEL_ENTRIES else \
            self._attention_choices.setdefault((entries * n_tokens).bit_length(), KernelChoice())
        use_parallel = choice is not None and choice.choose()
        out = np.empty((n_tokens, kv_heads * group * head_dim), np.float32)
        start = time.perf_counter()
        (parallel if use_parallel else serial)(
            np.ascontiguousarray(q, np.float32), keys, values, kv.key_scales,
            kv.value_scales, kv.positions, kv.n, np.ascontiguousarray(q_positions, np.int64),
            window or 0, f16_probabilities, out,
            np.empty((kv_heads, group, n_tokens), np.float32) if lse is None else lse)
        if choice is not None:
            choice.record(use_parallel, time.perf_counter() - start, entries * n_tokens)
        return out

    def prepare_attention(self, cache_type: str) -> None:
        attention_kernels.kernels(cache_type)

    def prepares(self, codec: Codec, cols: int) -> bool:
        return self.prepare_resident and codec.name in onnx_matmul.MAPPED and codec.supports(cols)

    def prepares_ffn(self, codec: Codec, hidden: int, neurons: int) -> bool:
        return self.prepare_resident and onnx_matmul.supports_ffn(codec, hidden, neurons)

    def prepare(self, codec: Codec, raw: np.ndarray, cols: int,
                alone: bool = False) -> Prepared | None:
        if not self.prepares(codec, cols):
            return None
        return onnx_matmul.OnnxMatMul(codec, raw, cols, self.threads, alone)

    def takes_down_rows(self, codec: Codec) -> bool:
        return codec.down_by_row  # OnnxFFN multiplies by them instead of re-encoding

    def prepare_ffn(self, codec: Codec, raw: np.ndarray, hidden: int, activation: str,
                    alone: bool = False, down_rows: np.ndarray | None = None
                    ) -> Prepared | None:
        if not self.prepares_ffn(codec, hidden, len(raw)):
            return None
        return onnx_matmul.OnnxFFN(codec, raw, hidden, activation, self.threads, alone,
                                   down_rows)

    def matvec(self, codec: Codec, raw: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
        if codec.fused:
            codec.matvec(raw, x, out)
        else:
            super().matvec(codec, raw, x, out)

    def gate_activations(self, codec: Codec, raw: np.ndarray, x: np.ndarray, activation: str,
                         out: np.ndarray) -> None:
        if codec.fused:
            codec.gate_activations(raw, x, activation, out)
        else:
            super().gate_activations(codec, raw, x, activation, out)

    def bundle_ffn(self, codec: Codec, raw: np.ndarray, rows: np.ndarray, x: np.ndarray,
                   activation: str, gate_act: np.ndarray | None, hidden_act: np.ndarray,
                   out: np.ndarray) -> None:
        if codec.fused:
            codec.bundle_ffn(raw, rows, x, activation, gate_act, hidden_act, out)
        else:
            super().bundle_ffn(codec, raw, rows, x, activation, gate_act, hidden_act, out)
