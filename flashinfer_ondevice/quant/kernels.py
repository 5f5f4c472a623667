"""Fused numba kernels: matrix-vector products straight from codec bytes (no float copy).

Decode (one token) is memory-bound; reading int8/int4 rows and their group scales once, in
parallel over rows, is what makes a compressed model fast on a CPU. Prefill (many tokens)
decodes to float32 and uses BLAS instead (see runtime/stored.py). Compiled on first use and
cached on disk (numba cache=True).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

GROUP = 64  # values per scale group of the grouped codecs (quant/codecs.py)

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@njit(cache=True, inline="always", fastmath=True)
def _row_dot(row, x, ng, bits):
    """Dot product of one encoded row with x."""
    acc = np.float32(0.0)
    scales = row[: 4 * ng].view(np.float32)
    payload = row[4 * ng:]
    if bits == 8:
        q = payload.view(np.int8)
        for g in range(ng):
            s = np.float32(0.0)
            base = g * GROUP
            for j in range(GROUP):
                s += np.float32(q[base + j]) * x[base + j]
            acc += scales[g] * s
    else:
        for g in range(ng):
            s = np.float32(0.0)
            base = g * GROUP
            for j in range(GROUP // 2):
                b = payload[base // 2 + j]
                s += np.float32(np.int32(b & 15) - 8) * x[base + 2 * j]
                s += np.float32(np.int32(b >> 4) - 8) * x[base + 2 * j + 1]
            acc += scales[g] * s
    return acc


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def matvec(raw, x, ng, bits, out):
    """out[r] = decode(raw[r]) . x for every row r."""
    for r in prange(raw.shape[0]):
        out[r] = _row_dot(raw[r], x, ng, bits)


@njit(cache=True, inline="always", fastmath=True)
def activate(g, kind):
    if kind == 0:  # gelu, tanh approximation
        return np.float32(0.5) * g * (np.float32(1.0) + math.tanh(
            np.float32(_SQRT_2_OVER_PI) * (g + np.float32(0.044715) * g * g * g)))
    return g / (np.float32(1.0) + math.exp(-g))  # silu


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def gate_activations(raw, x, ng, bits, activation, out):
    """out[i] = act(gate_i . x), gate_i being the first row of raw[i] (a bundle or a gate row)."""
    row_nbytes = 4 * ng + GROUP * ng * bits // 8
    for i in prange(raw.shape[0]):
        out[i] = activate(_row_dot(raw[i, :row_nbytes], x, ng, bits), activation)


@njit(cache=True, inline="always", fastmath=True)
def _add_scaled_row(row, a, ng, bits, acc):
    """acc += a * decode(row)."""
    scales = row[: 4 * ng].view(np.float32)
    payload = row[4 * ng:]
    if bits == 8:
        q = payload.view(np.int8)
        for g in range(ng):
            s = scales[g] * a
            base = g * GROUP
            for k in range(GROUP):
                acc[base + k] += s * np.float32(q[base + k])
    else:
        for g in range(ng):
            s = scales[g] * a
            base = g * GROUP
            for k in range(GROUP // 2):
                b = payload[base // 2 + k]
                acc[base + 2 * k] += s * np.float32(np.int32(b & 15) - 8)
                acc[base + 2 * k + 1] += s * np.float32(np.int32(b >> 4) - 8)


FFN_PARTS = 32  # neurons are split into this many parts, each summing its own output


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def sum_parts(partial, out):
    """out = the sum of the parts' partial outputs (parts, hidden), in a fixed order (so the
    result depends only on the inputs); every bundled FFN kernel ends with it."""
    for k in prange(out.shape[0]):
        total = np.float32(0.0)
        for p in range(partial.shape[0]):
            total += partial[p, k]
        out[k] = total


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def bundled_ffn(raw, rows, x, ng, bits, row_nbytes, activation, gate_act, hidden_act, out):
    """FFN over the row-column bundles raw[rows] ([gate row | up row | down column]) for one
    token: the other neurons count as zero (sparse), or pass every row for the dense FFN.

    Each bundle is used whole while it is in cache (gate, up, then its down column added to a
    partial output): one sequential pass over the bytes. Parts of the neuron list run in
    parallel, each into its own partial output, summed at the end in a fixed order (so the
    result depends only on the inputs).
    gate_act: act(gate . x) of each of rows, if already known (gate-first selection), else
    empty. hidden_act[j] receives act(gate . x) * (up . x) of rows[j]; out the FFN output.
    """
    n = rows.shape[0]
    known = gate_act.shape[0] == n
    parts = max(1, min(n, FFN_PARTS))
    partial = np.zeros((parts, ng * GROUP), np.float32)
    for p in prange(parts):
        acc = partial[p]
        for j in range(p * n // parts, (p + 1) * n // parts):
            i = rows[j]
            if known:
                act = gate_act[j]
            else:
                act = activate(_row_dot(raw[i, :row_nbytes], x, ng, bits), activation)
            h = act * _row_dot(raw[i, row_nbytes:2 * row_nbytes], x, ng, bits)
            hidden_act[j] = h
            if h != 0.0:
                _add_scaled_row(raw[i, 2 * row_nbytes:3 * row_nbytes], h, ng, bits, acc)
    sum_parts(partial, out)


def warm_up(bits: int) -> None:
    """Load (or compile) every kernel for `bits` now, so the JIT runtime is part of the
    process baseline rather than a surprise inside a memory budget."""
    x = np.zeros(GROUP, np.float32)
    out = np.zeros(1, np.float32)
    nbytes = 4 + GROUP * bits // 8
    raw = np.zeros((1, nbytes), np.uint8)
    matvec(raw, x, 1, bits, out)
    bundles = np.zeros((1, 3 * nbytes), np.uint8)
    for gate_act in (np.zeros(0, np.float32), np.zeros(1, np.float32)):
        bundled_ffn(bundles, np.zeros(1, np.int64), x, 1, bits, nbytes, 0, gate_act,
                    np.zeros(1, np.float32), np.zeros(GROUP, np.float32))
    gate_activations(bundles, x, 1, bits, 0, out)
