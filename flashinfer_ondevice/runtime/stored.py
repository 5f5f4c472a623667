"""Weights kept as codec bytes: matrices and FFN row-column bundles that compute directly.

One token (decode) runs the codec's kernels on the bytes (fused numba kernels where the codec
has them); several tokens (prefill) run its batched kernel (a few hundred rows decoded to
float32 at a time and BLAS, which bounds the temporary memory). Resident and streamed
weights use these same objects, so a streamed forward pass computes exactly what a fully
resident one does. They implement the `Matrix` and `FeedForward` interfaces of weights.py.
"""

from __future__ import annotations

import numpy as np

from ..quant.codecs import Codec, codec


class StoredMatrix:
    """rows x cols matrix as `raw` (rows, row_nbytes) codec bytes; apply(x) = x @ W.T."""

    def __init__(self, raw: np.ndarray, codec_name: str, cols: int):
        self.raw = raw
        self.codec: Codec = codec(codec_name)
        self.cols = cols
        self.rows = raw.shape[0]

    def decode_rows(self, start: int, end: int) -> np.ndarray:
        return self.codec.decode(self.raw[start:end], self.cols)

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if len(x) > 1:
            return self.codec.matmul(self.raw, x)
        out = np.empty((1, self.rows), np.float32)
        self.codec.matvec(self.raw, x[0], out[0])
        return out


class BundledFFN:
    """An FFN whose neuron i is raw[i] = [gate row | up row | down column] (codec bytes),
    with the architecture's activation ("gelu_tanh" or "silu")."""

    def __init__(self, raw: np.ndarray, codec_name: str, hidden: int, activation: str):
        self.raw = raw
        self.codec = codec(codec_name)
        self.hidden = hidden
        self.activation = activation
        self.row_nbytes = self.codec.row_nbytes(hidden)

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if len(x) == 1:
            return self.apply_rows(x[0], np.arange(len(self.raw)))[None]
        return self.codec.bundle_ffn_matmul(self.raw, x, self.activation)

    def apply_rows(self, x: np.ndarray, rows: np.ndarray,
                   gate_act: np.ndarray | None = None) -> np.ndarray:
        """The FFN output of one token (x: (hidden,)) counting only neurons raw[rows];
        `gate_act`: their act(gate . x), when the caller has them already."""
        out = np.empty(self.hidden, np.float32)
        hidden_act = np.empty(len(rows), np.float32)
        self.codec.bundle_ffn(self.raw, rows, x, self.activation, gate_act, hidden_act, out)
        return out

    def gate_activations(self, x: np.ndarray) -> np.ndarray:
        """act(gate . x) of every neuron for one token (x: (hidden,))."""
        out = np.empty(len(self.raw), np.float32)
        self.codec.gate_activations(self.raw, x, self.activation, out)
        return out
