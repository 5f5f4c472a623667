"""Fused numba kernels of the palette codecs: products straight from table + index bytes.

A palette row (quant/codecs.py) is [table: 2^b float16][indices: b bits each, packed little-
endian, so that 8 indices fill exactly b bytes]. A kernel converts the row's table to float32
once (2^b values), then gathers from it for every index: no float copy of the weights. The
codecs allow 2, 3 and 4 bits (the widths these loops know).
Same entry points and conventions as quant/kernels.py (the grouped codecs' kernels).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .kernels import FFN_PARTS, activate, sum_parts

# 2^(e - 25) for a half's exponent field e (e = 0: the subnormal scale 2^-24)
_EXP2 = np.array([2.0 ** -24] + [2.0 ** (e - 25) for e in range(1, 32)], np.float32)


@njit(cache=True, inline="always")
def half_to_float(half):
    """The float32 value of a finite float16 given as its 16 bits (the encoders write
    float16 of finite values, never infinities)."""
    h = np.uint32(half)
    exponent = (h >> 10) & 31
    mantissa = h & 1023
    value = np.float32(mantissa + (1024 if exponent else 0)) * _EXP2[exponent]
    return -value if h & 0x8000 else value


@njit(cache=True, inline="always")
def _table(row, k, table):
    """table[:k] = the row's float16 table as float32."""
    halves = row[:2 * k].view(np.uint16)
    for i in range(k):
        table[i] = half_to_float(halves[i])


@njit(cache=True, inline="always", fastmath=True)
def gather_dot(p, j, x, bits, table):
    """Sum of table[index] * x over the indices of packed group j: byte j (2 indices at 4
    bits, 4 at 2 bits) or bytes 3j..3j+2 (8 indices at 3 bits)."""
    if bits == 4:
        b = p[j]
        return table[b & 15] * x[2 * j] + table[b >> 4] * x[2 * j + 1]
    if bits == 2:
        b = p[j]
        return (table[b & 3] * x[4 * j] + table[(b >> 2) & 3] * x[4 * j + 1]
                + table[(b >> 4) & 3] * x[4 * j + 2] + table[b >> 6] * x[4 * j + 3])
    w = np.uint32(p[3 * j]) | (np.uint32(p[3 * j + 1]) << 8) | (np.uint32(p[3 * j + 2]) << 16)
    xs = x[8 * j:8 * j + 8]
    return (table[w & 7] * xs[0] + table[(w >> 3) & 7] * xs[1]
            + table[(w >> 6) & 7] * xs[2] + table[(w >> 9) & 7] * xs[3]
            + table[(w >> 12) & 7] * xs[4] + table[(w >> 15) & 7] * xs[5]
            + table[(w >> 18) & 7] * xs[6] + table[(w >> 21) & 7] * xs[7])


@njit(cache=True, inline="always", fastmath=True)
def _row_dot(row, x, bits, table):
    """Dot product of one palette row with x."""
    k = 1 << bits
    _table(row, k, table)
    p = row[2 * k:]
    acc = np.float32(0.0)
    for j in range(x.shape[0] // (8 // bits if bits != 3 else 8)):
        acc += gather_dot(p, j, x, bits, table)
    return acc


@njit(cache=True, inline="always", fastmath=True)
def _add_scaled_row(row, a, bits, table, acc):
    """acc += a * decode(row)."""
    k = 1 << bits
    _table(row, k, table)
    for i in range(k):
        table[i] *= a
    p = row[2 * k:]
    if bits == 4:
        for j in range(acc.shape[0] // 2):
            b = p[j]
            acc[2 * j] += table[b & 15]
            acc[2 * j + 1] += table[b >> 4]
    elif bits == 2:
        for j in range(acc.shape[0] // 4):
            b = p[j]
            acc[4 * j] += table[b & 3]
            acc[4 * j + 1] += table[(b >> 2) & 3]
            acc[4 * j + 2] += table[(b >> 4) & 3]
            acc[4 * j + 3] += table[b >> 6]
    else:
        for g in range(acc.shape[0] // 8):
            w = np.uint32(p[3 * g]) | (np.uint32(p[3 * g + 1]) << 8) | \
                (np.uint32(p[3 * g + 2]) << 16)
            for i in range(8):
                acc[8 * g + i] += table[(w >> np.uint32(3 * i)) & 7]


@njit(cache=True, nogil=True)
def decode(raw, bits, out):
    """out[r] = the float32 values of palette row raw[r] (out: (rows, cols)); one loop per
    width, as in _row_dot (constant shifts). Serial on purpose: prefill calls it between BLAS
    products, and a parallel numba region there fights BLAS's spinning threads for the cores
    (pal4 prefill measured 7.6 tok/s with it, the batched product 38x slower than serial)."""
    k = 1 << bits
    for r in prange(raw.shape[0]):
        table = np.empty(k, np.float32)
        _table(raw[r], k, table)
        p = raw[r, 2 * k:]
        o = out[r]
        if bits == 4:
            for j in range(o.shape[0] // 2):
                b = p[j]
                o[2 * j] = table[b & 15]
                o[2 * j + 1] = table[b >> 4]
        elif bits == 2:
            for j in range(o.shape[0] // 4):
                b = p[j]
                o[4 * j] = table[b & 3]
                o[4 * j + 1] = table[(b >> 2) & 3]
                o[4 * j + 2] = table[(b >> 4) & 3]
                o[4 * j + 3] = table[b >> 6]
        else:
            for g in range(o.shape[0] // 8):
                w = np.uint32(p[3 * g]) | (np.uint32(p[3 * g + 1]) << 8) | \
                    (np.uint32(p[3 * g + 2]) << 16)
                o[8 * g] = table[w & 7]
                o[8 * g + 1] = table[(w >> 3) & 7]
                o[8 * g + 2] = table[(w >> 6) & 7]
                o[8 * g + 3] = table[(w >> 9) & 7]
                o[8 * g + 4] = table[(w >> 12) & 7]
                o[8 * g + 5] = table[(w >> 15) & 7]
                o[8 * g + 6] = table[(w >> 18) & 7]
                o[8 * g + 7] = table[(w >> 21) & 7]


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def matvec(raw, x, bits, out):
    """out[r] = decode(raw[r]) . x for every row r."""
    for r in prange(raw.shape[0]):
        table = np.empty(1 << bits, np.float32)
        out[r] = _row_dot(raw[r], x, bits, table)


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def gate_activations(raw, x, bits, activation, out):
    """out[i] = act(gate_i . x), gate_i being the first row of raw[i]."""
    for i in prange(raw.shape[0]):
        table = np.empty(1 << bits, np.float32)
        out[i] = activate(_row_dot(raw[i], x, bits, table), activation)


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def bundled_ffn(raw, rows, x, bits, row_nbytes, activation, gate_act, hidden_act, out):
    """FFN over the bundles raw[rows] for one token; see quant/kernels.bundled_ffn."""
    n = rows.shape[0]
    known = gate_act.shape[0] == n
    parts = max(1, min(n, FFN_PARTS))
    hidden = x.shape[0]
    partial = np.zeros((parts, hidden), np.float32)
    for p in prange(parts):
        acc = partial[p]
        table = np.empty(1 << bits, np.float32)
        for j in range(p * n // parts, (p + 1) * n // parts):
            i = rows[j]
            if known:
                act = gate_act[j]
            else:
                act = activate(_row_dot(raw[i, :row_nbytes], x, bits, table), activation)
            h = act * _row_dot(raw[i, row_nbytes:2 * row_nbytes], x, bits, table)
            hidden_act[j] = h
            if h != 0.0:
                _add_scaled_row(raw[i, 2 * row_nbytes:3 * row_nbytes], h, bits, table, acc)
    sum_parts(partial, out)


def warm_up(bits: int) -> None:
    """Load (or compile) every kernel now (see quant/kernels.warm_up)."""
    x = np.zeros(8, np.float32)
    out = np.zeros(1, np.float32)
    nbytes = 2 * (1 << bits) + bits
    raw = np.zeros((1, nbytes), np.uint8)
    matvec(raw, x, bits, out)
    decode(raw, bits, np.zeros((1, 8), np.float32))
    bundles = np.zeros((1, 3 * nbytes), np.uint8)
    for gate_act in (np.zeros(0, np.float32), np.zeros(1, np.float32)):
        bundled_ffn(bundles, np.zeros(1, np.int64), x, bits, nbytes, 0, gate_act,
                    np.zeros(1, np.float32), np.zeros(8, np.float32))
    gate_activations(bundles, x, bits, 0, out)
