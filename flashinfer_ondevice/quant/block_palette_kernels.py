"""Fused numba kernels of the block-scaled palette codecs (bpal4, bpal3, bpal2): products
straight from scale + index bytes.

A row (quant/codecs.py) is [scales: one float16 per BLOCK weights][indices: b bits each,
packed little-endian, 8 indices in b bytes, as the per-row palettes pack them]. The table
(`grid`, 2^b float32 values) is the codec's, the same for every row, and is a cubic in the
index (`cubic`): dot products gather from the table (a small array that stays in L1), while
the loops that add decoded rows (the FFN's down columns, decoding for prefill) compute each
weight from the cubic, which vectorizes where a gather does not (Gemma 3's 2048-neuron FFN
down, one thread: 4 bits 0.48 -> 0.24 ms, 3 bits 0.40 -> 0.31, 2 bits -> 0.25).

At 2 and 3 bits the dot products read a table of partial sums instead (T-MAC's idea, here
over the codec's grid): built once per input vector, it holds, for every packed group of
indices (a byte of four 2-bit indices; 6 bits, two 3-bit indices), the sum of grid[index] *
x over that group for every value its bits can take, so a row costs one load per 4 (2 bits)
or 2 (3 bits) weights and no multiply but one per block. Measured on 8192 x 640, 2 threads:
2 bits 0.68 -> 0.37 ms, 3 bits 0.92 -> 0.73 ms (4 bits gathering: 0.54; a table of byte
sums measured 2x slower than gathering at 4 bits, and one of 9-bit groups at 3 bits 1.4x
slower on 1024 x 640 for its 4x larger table, so 4 bits gather and 3 bits take pairs). The
table is used while it stays within LUT_MAX_BYTES (in the caches): the choice depends on the
codec and the row width only, so a row's product never depends on the rows beside it.
Same entry points and conventions as quant/kernels.py and quant/palette_kernels.py.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .block_palette_fit import BLOCK
from .kernels import FFN_PARTS, activate, sum_parts
from .palette_kernels import gather_dot, half_to_float

LUT_MAX_BYTES = 1 << 20  # past this the table spills from L2 (3584 x 18944 at 2 bits, a 4.8
# MB table: 21.9 ms against 8.4 gathering)


@njit(cache=True, inline="always")
def _byte(row, at, j):
    """row[at + j] for an unsigned offset `at`: indices numba knows are not negative, so it
    does not check them, and the loops reading them vectorize (rows are read from the whole
    bundle row at an offset, never from a slice of it, whose layout numba does not know)."""
    return row[at + np.uint64(j)]


@njit(cache=True, inline="always")
def _prepare(row, at, grid, blocks, table, scales):
    """table = grid (a stack copy the gathers read), scales[b] = the block scales of the
    encoded row at row[at:]."""
    for i in range(grid.shape[0]):
        table[i] = grid[i]
    for b in range(blocks):
        scales[b] = half_to_float(np.uint16(_byte(row, at, 2 * b)) |
                                  (np.uint16(_byte(row, at, 2 * b + 1)) << 8))


@njit(cache=True, inline="always")
def _groups(bits):
    """(indices per packed group of gather_dot, shift): group j is in block j >> shift."""
    per_group = 8 // bits if bits != 3 else 8
    return per_group, 5 - (1 if bits == 4 else 2 if bits == 2 else 3)


@njit(cache=True)
def lut_entries(bits, cols):
    """float32 entries of the partial-sum table for rows of `cols` weights (256 per byte of
    2-bit indices, 64 per 3-bit pair); 0 where the kernels gather from the grid instead."""
    entries = cols * 64 if bits == 2 else cols * 32 if bits == 3 else 0
    return entries if 4 * entries <= LUT_MAX_BYTES else 0


@njit(cache=True, fastmath=True)
def _build_lut(x, bits, grid, lut):
    """lut = the partial sums of grid values times x, for every packed group (see above)."""
    if bits == 2:
        for j in range(x.shape[0] // 4):
            x0, x1, x2, x3 = x[4 * j], x[4 * j + 1], x[4 * j + 2], x[4 * j + 3]
            for c3 in range(4):
                for c2 in range(4):
                    t = grid[c3] * x3 + grid[c2] * x2
                    for c1 in range(4):
                        u = t + grid[c1] * x1
                        k = (j << 8) + (c3 << 6) + (c2 << 4) + (c1 << 2)
                        for c0 in range(4):
                            lut[k + c0] = grid[c0] * x0 + u
        return
    for j in range(x.shape[0] // 2):
        x0, x1 = x[2 * j], x[2 * j + 1]
        for hi in range(8):
            t = grid[hi] * x1
            k = (j << 6) + (hi << 3)
            for lo in range(8):
                lut[k + lo] = grid[lo] * x0 + t


@njit(cache=True)
def _partial_sums(x, bits, grid):
    """The partial-sum table for x, or an empty array where the kernels gather instead."""
    lut = np.empty(lut_entries(bits, x.shape[0]), np.float32)
    if lut.shape[0]:
        _build_lut(x, bits, grid, lut)
    return lut


@njit(cache=True, inline="always", fastmath=True)
def _lut_dot(row, at, bits, lut, blocks):
    """Dot product of the encoded row at row[at:] with the x its table was built from."""
    p = at + np.uint64(2 * blocks)
    acc = np.float32(0.0)
    for b in range(blocks):
        s0, s1, s2, s3 = np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
        if bits == 2:  # 8 bytes a block
            for j in range(8 * b, 8 * b + 8, 4):
                s0 += lut[(j << 8) | _byte(row, p, j)]
                s1 += lut[((j + 1) << 8) | _byte(row, p, j + 1)]
                s2 += lut[((j + 2) << 8) | _byte(row, p, j + 2)]
                s3 += lut[((j + 3) << 8) | _byte(row, p, j + 3)]
        else:  # 4 groups of 3 bytes (four pairs) a block
            for g in range(4 * b, 4 * b + 4):
                w = np.uint32(_byte(row, p, 3 * g)) | \
                    (np.uint32(_byte(row, p, 3 * g + 1)) << 8) | \
                    (np.uint32(_byte(row, p, 3 * g + 2)) << 16)
                base = g << 8
                s0 += lut[base | (w & 63)]
                s1 += lut[(base + 64) | ((w >> 6) & 63)]
                s2 += lut[(base + 128) | ((w >> 12) & 63)]
                s3 += lut[(base + 192) | (w >> 18)]
        acc += half_to_float(np.uint16(_byte(row, at, 2 * b)) |
                             (np.uint16(_byte(row, at, 2 * b + 1)) << 8)) * \
            ((s0 + s1) + (s2 + s3))
    return acc


# The loops below run over a whole row, each value's product multiplied by its block's scale
# (scales[j >> shift]): measured on 8192x640, one thread, this is 1.4x int4's matvec, while a
# loop per block (sum a block, then scale it) is 3x slower than this (LLVM vectorizes the
# flat loop, not the 16-iteration one).

@njit(cache=True, inline="always", fastmath=True)
def _row_dot(row, at, x, bits, grid, table, scales):
    """Dot product of the encoded row at row[at:] with x."""
    blocks = x.shape[0] // BLOCK
    _prepare(row, at, grid, blocks, table, scales)
    p = at + np.uint64(2 * blocks)
    acc = np.float32(0.0)
    if bits == 4:
        for j in range(x.shape[0] // 2):
            c = _byte(row, p, j)
            acc += (table[c & 15] * x[2 * j] + table[c >> 4] * x[2 * j + 1]) * scales[j >> 4]
        return acc
    packed = row[int(p):]  # wider rows than the partial-sum table takes, at 2 and 3 bits
    per_group, shift = _groups(bits)
    for j in range(x.shape[0] // per_group):
        acc += gather_dot(packed, j, x, bits, table) * scales[j >> shift]
    return acc


@njit(cache=True, inline="always", fastmath=True)
def _pair_dot(row, at, other_row, other_at, x, bits, grid, table, scales, other_scales):
    """(row . x, other row . x) for two encoded rows (at row[at:], other_row[other_at:]) in
    one pass over x (each x value loaded once for both; the FFN's gate and up rows, or
    neighbouring rows of a matrix). Measured on Gemma 3's 2048-neuron bpal4 FFN, 2 threads:
    the bundled kernel 1.1 ms with two _row_dot calls, 0.6 ms with this."""
    blocks = x.shape[0] // BLOCK
    _prepare(row, at, grid, blocks, table, scales)
    _prepare(other_row, other_at, grid, blocks, table, other_scales)
    p, q = at + np.uint64(2 * blocks), other_at + np.uint64(2 * blocks)
    a, b = np.float32(0.0), np.float32(0.0)
    if bits == 4:  # the loop written out for 4 bits: x loaded once for both rows
        for j in range(x.shape[0] // 2):
            x0, x1 = x[2 * j], x[2 * j + 1]
            c, d = _byte(row, p, j), _byte(other_row, q, j)
            a += (table[c & 15] * x0 + table[c >> 4] * x1) * scales[j >> 4]
            b += (table[d & 15] * x0 + table[d >> 4] * x1) * other_scales[j >> 4]
        return a, b
    packed, other_packed = row[int(p):], other_row[int(q):]
    per_group, shift = _groups(bits)
    for j in range(x.shape[0] // per_group):
        a += gather_dot(packed, j, x, bits, table) * scales[j >> shift]
        b += gather_dot(other_packed, j, x, bits, table) * other_scales[j >> shift]
    return a, b


@njit(cache=True, inline="always", fastmath=True)
def _weight(index, d3, d2, d1, d0):
    """grid[index] computed from the codec's cubic (quant/codecs.py): no gather, so the
    loops that add decoded rows vectorize (the coefficients are passed as scalars: read from
    their array inside a loop that stores to acc, they would be reloaded every time)."""
    u = np.float32(index)
    return ((d3 * u + d2) * u + d1) * u + d0


@njit(cache=True, inline="always")
def _unpack(row, start, bits, n, indices):
    """indices[:n] = the n indices packed in row[start:] (start unsigned), one byte each."""
    if bits == 2:
        for j in range(n // 4):
            b = row[start + np.uint64(j)]
            indices[4 * j] = b & 3
            indices[4 * j + 1] = (b >> 2) & 3
            indices[4 * j + 2] = (b >> 4) & 3
            indices[4 * j + 3] = b >> 6
        return
    for g in range(n // 8):
        at = start + np.uint64(3 * g)
        w = np.uint32(row[at]) | (np.uint32(row[at + np.uint64(1)]) << 8) | \
            (np.uint32(row[at + np.uint64(2)]) << 16)
        indices[8 * g] = w & 7
        indices[8 * g + 1] = (w >> 3) & 7
        indices[8 * g + 2] = (w >> 6) & 7
        indices[8 * g + 3] = (w >> 9) & 7
        indices[8 * g + 4] = (w >> 12) & 7
        indices[8 * g + 5] = (w >> 15) & 7
        indices[8 * g + 6] = (w >> 18) & 7
        indices[8 * g + 7] = w >> 21


@njit(cache=True, inline="always", fastmath=True)
def _add_scaled_row(row, start, a, bits, cubic, scales, indices, acc, overwrite):
    """acc += a * decode(the encoded row at row[start:]), or acc = a * decode(...) where
    `overwrite`, a block at a time with each weight computed from the cubic. Gemma 3's
    2048-neuron FFN down at 4 bits, one thread: gathering from the grid 0.48 ms, computing
    0.29 ms. What keeps it vectorized (each measured): the coefficients and the block scales
    in scalars and a float32 array before the loop, and the bytes read from the whole bundle
    row at an unsigned offset (a slice of the row has a layout numba cannot vectorize over,
    and a signed offset makes it check for negative indices: 0.37-0.86 ms). At 2 and 3 bits
    the indices are unpacked into `indices` first (unpacking in the same loop: 3 bits 0.85
    ms)."""
    blocks = acc.shape[0] // BLOCK
    at = np.uint64(start)
    for b in range(blocks):
        i = at + np.uint64(2 * b)
        scales[b] = half_to_float(np.uint16(row[i]) | (np.uint16(row[i + np.uint64(1)]) << 8)) * a
    at += np.uint64(2 * blocks)
    d3, d2, d1, d0 = cubic[0], cubic[1], cubic[2], cubic[3]
    if bits != 4:
        _unpack(row, at, bits, acc.shape[0], indices)
    if overwrite:
        acc[:] = 0.0
    for b in range(blocks):
        s = scales[b]
        if bits == 4:
            for k in range(BLOCK // 2):
                c = row[at + np.uint64(BLOCK // 2 * b + k)]
                acc[BLOCK * b + 2 * k] += s * _weight(c & 15, d3, d2, d1, d0)
                acc[BLOCK * b + 2 * k + 1] += s * _weight(c >> 4, d3, d2, d1, d0)
        else:
            for k in range(BLOCK):
                acc[BLOCK * b + k] += s * _weight(indices[BLOCK * b + k], d3, d2, d1, d0)


@njit(cache=True, nogil=True)
def decode(raw, bits, cubic, out):
    """out[r] = the float32 values of row raw[r]. Serial, as palette_kernels.decode (prefill
    calls it between BLAS products)."""
    scales = np.empty(out.shape[1] // BLOCK, np.float32)
    indices = np.empty(out.shape[1], np.uint8)
    for r in range(raw.shape[0]):
        _add_scaled_row(raw[r], 0, np.float32(1.0), bits, cubic, scales, indices, out[r], True)


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def matvec(raw, x, bits, grid, out):
    """out[r] = decode(raw[r]) . x for every row r: from the partial-sum table where there is
    one (2 and 3 bits), else gathering; at 4 bits two rows at a time (_pair_dot:
    on Gemma 3's 262144 x 640 bpal4 output layer, 2 threads, 31-35 ms a row at a time, 21-22
    ms so; at 3 and 2 bits pairs measured 1.25-1.4x slower on 8192 x 640)."""
    n = raw.shape[0]
    start = np.uint64(0)
    lut = _partial_sums(x, bits, grid)
    if lut.shape[0]:
        for r in prange(n):
            out[r] = _lut_dot(raw[r], np.uint64(0), bits, lut, x.shape[0] // BLOCK)
        return
    if bits != 4:
        for r in prange(n):
            table = np.empty(grid.shape[0], np.float32)
            scales = np.empty(x.shape[0] // BLOCK, np.float32)
            out[r] = _row_dot(raw[r], np.uint64(0), x, bits, grid, table, scales)
        return
    for pair in prange((n + 1) // 2):
        table = np.empty(grid.shape[0], np.float32)
        scales = np.empty(x.shape[0] // BLOCK, np.float32)
        second_scales = np.empty(x.shape[0] // BLOCK, np.float32)
        r = 2 * pair
        # an odd count's last row is paired with itself, through this same code: the
        # compiler may order a sum differently in a second copy of it, and a row's product
        # must not depend on where its matrix (or streamed chunk) starts
        second = min(r + 1, n - 1)
        a, b = _pair_dot(raw[r], start, raw[second], start, x, bits, grid, table, scales,
                         second_scales)
        out[r] = a
        out[second] = b


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def gate_activations(raw, x, bits, grid, activation, out):
    """out[i] = act(gate_i . x), gate_i being the first row of raw[i]."""
    lut = _partial_sums(x, bits, grid)
    if lut.shape[0]:
        for i in prange(raw.shape[0]):
            out[i] = activate(_lut_dot(raw[i], np.uint64(0), bits, lut, x.shape[0] // BLOCK),
                              activation)
        return
    for i in prange(raw.shape[0]):
        table = np.empty(grid.shape[0], np.float32)
        scales = np.empty(x.shape[0] // BLOCK, np.float32)
        out[i] = activate(_row_dot(raw[i], np.uint64(0), x, bits, grid, table, scales), activation)


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def bundled_ffn(raw, rows, x, bits, grid, cubic, row_nbytes, activation, gate_act, hidden_act,
                out):
    """FFN over the bundles raw[rows] for one token; see quant/kernels.bundled_ffn."""
    n = rows.shape[0]
    known = gate_act.shape[0] == n
    parts = max(1, min(n, FFN_PARTS))
    hidden = x.shape[0]
    partial = np.zeros((parts, hidden), np.float32)
    lut = _partial_sums(x, bits, grid)
    for p in prange(parts):
        acc = partial[p]
        indices = np.empty(hidden, np.uint8)
        table = np.empty(grid.shape[0], np.float32)
        scales = np.empty(hidden // BLOCK, np.float32)
        up_scales = np.empty(hidden // BLOCK, np.float32)
        for j in range(p * n // parts, (p + 1) * n // parts):
            i = rows[j]
            bundle, up_at = raw[i], np.uint64(row_nbytes)
            if lut.shape[0]:
                up = _lut_dot(bundle, up_at, bits, lut, hidden // BLOCK)
                h = gate_act[j] * up if known else \
                    activate(_lut_dot(bundle, np.uint64(0), bits, lut, hidden // BLOCK),
                             activation) * up
            elif known:
                h = gate_act[j] * _row_dot(bundle, up_at, x, bits, grid, table, scales)
            else:
                gate, up = _pair_dot(bundle, np.uint64(0), bundle, up_at, x, bits, grid, table,
                                     scales, up_scales)
                h = activate(gate, activation) * up
            hidden_act[j] = h
            if h != 0.0:
                _add_scaled_row(bundle, 2 * row_nbytes, h, bits, cubic, scales, indices, acc,
                                False)
    sum_parts(partial, out)


def warm_up(bits: int, grid: np.ndarray, cubic: np.ndarray) -> None:
    """Load (or compile) every kernel now (see quant/kernels.warm_up)."""
    x = np.zeros(BLOCK, np.float32)
    out = np.zeros(1, np.float32)
    nbytes = 2 + BLOCK * bits // 8
    raw = np.zeros((1, nbytes), np.uint8)
    matvec(raw, x, bits, grid, out)
    decode(raw, bits, cubic, np.zeros((1, BLOCK), np.float32))
    bundles = np.zeros((1, 3 * nbytes), np.uint8)
    for gate_act in (np.zeros(0, np.float32), np.zeros(1, np.float32)):
        bundled_ffn(bundles, np.zeros(1, np.int64), x, bits, grid, cubic, nbytes, 0, gate_act,
                    np.zeros(1, np.float32), np.zeros(BLOCK, np.float32))
    gate_activations(bundles, x, bits, grid, 0, out)
