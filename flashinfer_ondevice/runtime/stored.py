"""Weights kept as codec bytes: matrices and FFN row-column bundles that compute directly.

Each holds its codec bytes and the backend that computes from them (backends/): one token
(decode) runs the backend's one-token operations on the bytes (fused kernels where it has
them); several tokens (prefill) its batched ones. Resident and streamed weights use these
same objects, so a streamed forward pass computes what a fully resident one does; a resident
matrix a backend has prepared in its own form is a `PreparedMatrix` instead. They implement
the `Matrix` and `FeedForward` interfaces of weights.py.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..backends.base import Backend, Prepared
from ..memory import release_freed_memory
from ..quant.codecs import Codec, codec


class StoredMatrix:
    """rows x cols matrix as `raw` (rows, row_nbytes) codec bytes; apply(x) = x @ W.T."""

    def __init__(self, raw: np.ndarray, codec_name: str, cols: int, backend: Backend):
        self.raw = raw
        self.codec: Codec = codec(codec_name)
        self.cols = cols
        self.rows = raw.shape[0]
        self.backend = backend

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes

    def decode_rows(self, start: int, end: int) -> np.ndarray:
        return self.backend.decode(self.codec, self.raw[start:end], self.cols)

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if len(x) > 1:
            return self.backend.matmul(self.codec, self.raw, x)
        out = np.empty((1, self.rows), np.float32)
        self.backend.matvec(self.codec, self.raw, x[0], out[0])
        return out


PREPARE_CHUNK = 16 << 20  # codec bytes handed to a backend at a time (bounds load's peak)


class PreparedMatrix:
    """A resident matrix (or dense FFN) in its backend's own form, prepared in chunks of
    rows (the codec bytes are let go); apply(x) = x @ W.T (or the FFN of x)."""

    def __init__(self, parts: list[Prepared], rows: int):
        self.parts = parts
        self.rows = rows
        self.nbytes = sum(p.nbytes for p in parts)

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if len(self.parts) == 1:
            return self.parts[0].apply(x)
        out = np.empty((len(x), self.rows), np.float32)
        start = 0
        for part in self.parts:
            y = part.apply(x)
            out[:, start:start + y.shape[1]] = y
            start += y.shape[1]
        return out


def row_ranges(counts: list[int], start: int, end: int) -> list[tuple[int, int, int]]:
    """Rows [start, end) of parts stacked by rows (part k holds counts[k]), as (k, first row,
    end row) within each part they touch."""
    out, base = [], 0
    for k, count in enumerate(counts):
        lo, hi = max(start - base, 0), min(end - base, count)
        if lo < hi:
            out.append((k, lo, hi))
        base += count
    return out


class StackedMatrix(PreparedMatrix):
    """Codec bytes of different codecs stacked by rows (the output layer's rows across its
    tiers, runtime/head_rows.py): a PreparedMatrix of StoredMatrix parts, whose rows can
    also be decoded."""

    def decode_rows(self, start: int, end: int) -> np.ndarray:
        return np.concatenate([self.parts[k].decode_rows(lo, hi) for k, lo, hi in
                               row_ranges([p.rows for p in self.parts], start, end)])


def resident_matrix(read: Callable[[int, int], np.ndarray], rows: int, codec_name: str,
                    cols: int, backend: Backend,
                    alone: bool = False) -> StoredMatrix | PreparedMatrix:
    """A matrix that stays in memory, its rows [start, end) given by `read`: prepared by the
    backend a chunk of rows at a time where it does that (so loading never holds a large
    matrix twice), else its codec bytes; `alone` as for Backend.prepare."""
    c = codec(codec_name)
    chunk = max(1, PREPARE_CHUNK // c.row_nbytes(cols))
    parts = []
    for start in range(0, rows, chunk):
        raw = read(start, min(start + chunk, rows))
        prepared = backend.prepare(c, raw, cols, alone)
        if prepared is None:  # the backend computes from bytes: keep them all
            return StoredMatrix(raw if rows <= chunk else read(0, rows), codec_name, cols,
                                backend)
        parts.append(prepared)
        del raw
        release_freed_memory()  # glibc would keep each chunk's freed bytes otherwise
    return PreparedMatrix(parts, rows)


def resident_ffn(raw: np.ndarray, codec_name: str, hidden: int, activation: str,
                 backend: Backend, alone: bool = False,
                 down_rows: np.ndarray | None = None) -> BundledFFN | PreparedMatrix:
    """A dense FFN that stays in memory: prepared by the backend where it does that (a
    hidden x hidden map, x -> FFN(x)), else its bundles; `alone` and `down_rows` as for
    Backend.prepare_ffn."""
    prepared = backend.prepare_ffn(codec(codec_name), raw, hidden, activation, alone,
                                   down_rows)
    if prepared is None:
        return BundledFFN(raw, codec_name, hidden, activation, backend)
    return PreparedMatrix([prepared], hidden)


class BundledFFN:
    """An FFN whose neuron i is raw[i] = [gate row | up row | down column] (codec bytes),
    with the architecture's activation ("gelu_tanh" or "silu")."""

    def __init__(self, raw: np.ndarray, codec_name: str, hidden: int, activation: str,
                 backend: Backend):
        self.raw = raw
        self.codec = codec(codec_name)
        self.hidden = hidden
        self.activation = activation
        self.backend = backend
        self.row_nbytes = self.codec.row_nbytes(hidden)

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if len(x) == 1:
            return self.apply_rows(x[0], np.arange(len(self.raw)))[None]
        return self.backend.bundle_ffn_matmul(self.codec, self.raw, x, self.activation)

    def apply_rows(self, x: np.ndarray, rows: np.ndarray,
                   gate_act: np.ndarray | None = None) -> np.ndarray:
        """The FFN output of one token (x: (hidden,)) counting only neurons raw[rows];
        `gate_act`: their act(gate . x), when the caller has them already."""
        out = np.empty(self.hidden, np.float32)
        hidden_act = np.empty(len(rows), np.float32)
        self.backend.bundle_ffn(self.codec, self.raw, rows, x, self.activation, gate_act,
                                hidden_act, out)
        return out

    def gate_activations(self, x: np.ndarray) -> np.ndarray:
        """act(gate . x) of every neuron for one token (x: (hidden,))."""
        out = np.empty(len(self.raw), np.float32)
        self.backend.gate_activations(self.codec, self.raw, x, self.activation, out)
        return out
