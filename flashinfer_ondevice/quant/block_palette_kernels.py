"""Fused numba kernels of the block-scaled palette codecs (bpal4, bpal3, bpal2): products
straight from scale + index bytes.

A row (quant/codecs.py) is [scales: one float16 per BLOCK weights][indices: b bits each,
packed little-endian, 8 indices in b bytes, as the per-row palettes pack them]. The table
(`grid`, 2^b float32 values) is the codec's, the same for every row, so a kernel gathers
from one small array that stays in L1 and multiplies each block's sum once by its scale.
Same entry points and conventions as quant/kernels.py and quant/palette_kernels.py.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .block_palette_fit import BLOCK
from .kernels import activate
from .palette_kernels import half_to_float


@njit(cache=True, inline="always", fastmath=True)
def _block_dot(p, x, base, bits, grid):
    """Sum over one block of grid[index] * x, the block's indices starting at byte p[0]."""
    s = np.float32(0.0)
    if bits == 4:
        for j in range(BLOCK // 2):
            b = p[j]
            s += grid[b & 15] * x[base + 2 * j] + grid[b >> 4] * x[base + 2 * j + 1]
    elif bits == 2:
        for j in range(BLOCK // 4):
            b = p[j]
            s += (grid[b & 3] * x[base + 4 * j] + grid[(b >> 2) & 3] * x[base + 4 * j + 1]
                  + grid[(b >> 4) & 3] * x[base + 4 * j + 2] + grid[b >> 6] * x[base + 4 * j + 3])
    else:
        for g in range(BLOCK // 8):
            w = np.uint32(p[3 * g]) | (np.uint32(p[3 * g + 1]) << 8) | \
                (np.uint32(p[3 * g + 2]) << 16)
            o = base + 8 * g
            s += (grid[w & 7] * x[o] + grid[(w >> 3) & 7] * x[o + 1]
                  + grid[(w >> 6) & 7] * x[o + 2] + grid[(w >> 9) & 7] * x[o + 3]
                  + grid[(w >> 12) & 7] * x[o + 4] + grid[(w >> 15) & 7] * x[o + 5]
                  + grid[(w >> 18) & 7] * x[o + 6] + grid[(w >> 21) & 7] * x[o + 7])
    return s


@njit(cache=True, inline="always", fastmath=True)
def _row_dot(row, x, bits, grid):
    """Dot product of one encoded row with x."""
    blocks = x.shape[0] // BLOCK
    halves = row[:2 * blocks].view(np.uint16)
    step = BLOCK * bits // 8
    acc = np.float32(0.0)
    for b in range(blocks):
        start = 2 * blocks + b * step
        acc += half_to_float(halves[b]) * _block_dot(row[start:start + step], x, b * BLOCK,
                                                     bits, grid)
    return acc


@njit(cache=True, inline="always", fastmath=True)
def _decode_row(row, bits, grid, a, out):
    """out = a * decode(row) for one row."""
    blocks = out.shape[0] // BLOCK
    halves = row[:2 * blocks].view(np.uint16)
    p = row[2 * blocks:]
    for b in range(blocks):
        s = a * half_to_float(halves[b])
        base = b * BLOCK
        if bits == 4:
            for j in range(BLOCK // 2):
                v = p[base // 2 + j]
                out[base + 2 * j] = s * grid[v & 15]
                out[base + 2 * j + 1] = s * grid[v >> 4]
        elif bits == 2:
            for j in range(BLOCK // 4):
                v = p[base // 4 + j]
                for i in range(4):
                    out[base + 4 * j + i] = s * grid[(v >> (2 * i)) & 3]
        else:
            for g in range(BLOCK // 8):
                o = 3 * (base // 8 + g)
                w = np.uint32(p[o]) | (np.uint32(p[o + 1]) << 8) | (np.uint32(p[o + 2]) << 16)
                for i in range(8):
                    out[base + 8 * g + i] = s * grid[(w >> np.uint32(3 * i)) & 7]


@njit(cache=True, inline="always", fastmath=True)
def _add_scaled_row(row, a, bits, grid, acc, scratch):
    """acc += a * decode(row)."""
    _decode_row(row, bits, grid, a, scratch)
    for j in range(acc.shape[0]):
        acc[j] += scratch[j]


@njit(cache=True, nogil=True)
def decode(raw, bits, grid, out):
    """out[r] = the float32 values of row raw[r]. Serial, as palette_kernels.decode (prefill
    calls it between BLAS products)."""
    for r in range(raw.shape[0]):
        _decode_row(raw[r], bits, grid, np.float32(1.0), out[r])


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def matvec(raw, x, bits, grid, out):
    """out[r] = decode(raw[r]) . x for every row r."""
    for r in prange(raw.shape[0]):
        out[r] = _row_dot(raw[r], x, bits, grid)


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def gate_activations(raw, x, bits, grid, activation, out):
    """out[i] = act(gate_i . x), gate_i being the first row of raw[i]."""
    for i in prange(raw.shape[0]):
        out[i] = activate(_row_dot(raw[i], x, bits, grid), activation)


_FFN_PARTS = 32  # as in quant/kernels.py


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def bundled_ffn(raw, rows, x, bits, grid, row_nbytes, activation, gate_act, hidden_act, out):
    """FFN over the bundles raw[rows] for one token; see quant/kernels.bundled_ffn."""
    n = rows.shape[0]
    known = gate_act.shape[0] == n
    parts = max(1, min(n, _FFN_PARTS))
    hidden = x.shape[0]
    partial = np.zeros((parts, hidden), np.float32)
    for p in prange(parts):
        acc = partial[p]
        scratch = np.empty(hidden, np.float32)
        for j in range(p * n // parts, (p + 1) * n // parts):
            i = rows[j]
            if known:
                act = gate_act[j]
            else:
                act = activate(_row_dot(raw[i, :row_nbytes], x, bits, grid), activation)
            h = act * _row_dot(raw[i, row_nbytes:2 * row_nbytes], x, bits, grid)
            hidden_act[j] = h
            if h != 0.0:
                _add_scaled_row(raw[i, 2 * row_nbytes:3 * row_nbytes], h, bits, grid, acc,
                                scratch)
    for c in prange(hidden):
        total = np.float32(0.0)
        for p in range(parts):
            total += partial[p, c]
        out[c] = total


def warm_up(bits: int, grid: np.ndarray) -> None:
    """Load (or compile) every kernel now (see quant/kernels.warm_up)."""
    x = np.zeros(BLOCK, np.float32)
    out = np.zeros(1, np.float32)
    nbytes = 2 + BLOCK * bits // 8
    raw = np.zeros((1, nbytes), np.uint8)
    matvec(raw, x, bits, grid, out)
    decode(raw, bits, grid, np.zeros((1, BLOCK), np.float32))
    bundles = np.zeros((1, 3 * nbytes), np.uint8)
    for gate_act in (np.zeros(0, np.float32), np.zeros(1, np.float32)):
        bundled_ffn(bundles, np.zeros(1, np.int64), x, bits, grid, nbytes, 0, gate_act,
                    np.zeros(1, np.float32), np.zeros(BLOCK, np.float32))
    gate_activations(bundles, x, bits, grid, 0, out)
