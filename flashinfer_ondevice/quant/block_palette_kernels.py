"""Fused numba kernels of the block-scaled palette codecs (bpal4, bpal3, bpal2): products
straight from scale + index bytes.

A row (quant/codecs.py) is [scales: one float16 per BLOCK weights][indices: b bits each,
packed little-endian, 8 indices in b bytes, as the per-row palettes pack them]. The table
(`grid`, 2^b float32 values) is the codec's, the same for every row, so a kernel gathers
from one small array that stays in L1 and multiplies each block's sum once by its scale.

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
def _prepare(row, grid, blocks, table, scales):
    """table = grid (a stack copy the gathers read), scales[b] = the row's block scales."""
    for i in range(grid.shape[0]):
        table[i] = grid[i]
    halves = row[:2 * blocks].view(np.uint16)
    for b in range(blocks):
        scales[b] = half_to_float(halves[b])


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
def _lut_dot(row, bits, lut, blocks):
    """Dot product of one encoded row with the x its table was built from."""
    halves = row[:2 * blocks].view(np.uint16)
    p = row[2 * blocks:]
    acc = np.float32(0.0)
    for b in range(blocks):
        s0, s1, s2, s3 = np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
        if bits == 2:  # 8 bytes a block
            for j in range(8 * b, 8 * b + 8, 4):
                s0 += lut[(j << 8) | p[j]]
                s1 += lut[((j + 1) << 8) | p[j + 1]]
                s2 += lut[((j + 2) << 8) | p[j + 2]]
                s3 += lut[((j + 3) << 8) | p[j + 3]]
        else:  # 4 groups of 3 bytes (four pairs) a block
            for g in range(4 * b, 4 * b + 4):
                w = np.uint32(p[3 * g]) | (np.uint32(p[3 * g + 1]) << 8) | \
                    (np.uint32(p[3 * g + 2]) << 16)
                base = g << 8
                s0 += lut[base | (w & 63)]
                s1 += lut[(base + 64) | ((w >> 6) & 63)]
                s2 += lut[(base + 128) | ((w >> 12) & 63)]
                s3 += lut[(base + 192) | (w >> 18)]
        acc += half_to_float(halves[b]) * ((s0 + s1) + (s2 + s3))
    return acc


# The loops below run over a whole row, each value's product multiplied by its block's scale
# (scales[j >> shift]): measured on 8192x640, one thread, this is 1.4x int4's matvec, while a
# loop per block (sum a block, then scale it) is 3x slower than this (LLVM vectorizes the
# flat loop, not the 16-iteration one).

@njit(cache=True, inline="always", fastmath=True)
def _row_dot(row, x, bits, grid, table, scales):
    """Dot product of one encoded row with x."""
    blocks = x.shape[0] // BLOCK
    _prepare(row, grid, blocks, table, scales)
    p = row[2 * blocks:]
    per_group, shift = _groups(bits)
    acc = np.float32(0.0)
    for j in range(x.shape[0] // per_group):
        acc += gather_dot(p, j, x, bits, table) * scales[j >> shift]
    return acc


@njit(cache=True, inline="always", fastmath=True)
def _pair_dot(first, second, x, bits, grid, table, first_scales, second_scales):
    """(first . x, second . x) for two encoded rows in one pass over x (each x value loaded
    once for both; the FFN's gate and up rows, or neighbouring rows of a matrix). Measured on
    Gemma 3's 2048-neuron bpal4 FFN, 2 threads: the bundled kernel 1.1 ms with two _row_dot
    calls, 0.6 ms with this."""
    blocks = x.shape[0] // BLOCK
    _prepare(first, grid, blocks, table, first_scales)
    _prepare(second, grid, blocks, table, second_scales)
    p, q = first[2 * blocks:], second[2 * blocks:]
    a, b = np.float32(0.0), np.float32(0.0)
    if bits == 4:  # the loop written out for 4 bits: x loaded once for both rows
        for j in range(x.shape[0] // 2):
            x0, x1, c, d = x[2 * j], x[2 * j + 1], p[j], q[j]
            a += (table[c & 15] * x0 + table[c >> 4] * x1) * first_scales[j >> 4]
            b += (table[d & 15] * x0 + table[d >> 4] * x1) * second_scales[j >> 4]
        return a, b
    per_group, shift = _groups(bits)
    for j in range(x.shape[0] // per_group):
        a += gather_dot(p, j, x, bits, table) * first_scales[j >> shift]
        b += gather_dot(q, j, x, bits, table) * second_scales[j >> shift]
    return a, b


@njit(cache=True, inline="always", fastmath=True)
def _decode_row(row, bits, grid, a, table, scales, out):
    """out = a * decode(row) for one row."""
    blocks = out.shape[0] // BLOCK
    _prepare(row, grid, blocks, table, scales)
    for b in range(blocks):
        scales[b] *= a
    p = row[2 * blocks:]
    if bits == 4:
        for j in range(out.shape[0] // 2):
            b = p[j]
            s = scales[j >> 4]
            out[2 * j] = s * table[b & 15]
            out[2 * j + 1] = s * table[b >> 4]
    elif bits == 2:
        for j in range(out.shape[0] // 4):
            b = p[j]
            s = scales[j >> 3]
            out[4 * j] = s * table[b & 3]
            out[4 * j + 1] = s * table[(b >> 2) & 3]
            out[4 * j + 2] = s * table[(b >> 4) & 3]
            out[4 * j + 3] = s * table[b >> 6]
    else:
        for g in range(out.shape[0] // 8):
            w = np.uint32(p[3 * g]) | (np.uint32(p[3 * g + 1]) << 8) | \
                (np.uint32(p[3 * g + 2]) << 16)
            s = scales[g >> 2]
            for i in range(8):
                out[8 * g + i] = s * table[(w >> np.uint32(3 * i)) & 7]


@njit(cache=True, inline="always", fastmath=True)
def _add_scaled_row(row, a, bits, grid, table, scales, acc, scratch):
    """acc += a * decode(row); at 4 bits added in place a block at a time (Gemma 3's
    2048-neuron FFN, one thread: 1.12 -> 1.03 ms; decoding into scratch first measured no
    slower at 2 and 3 bits)."""
    if bits == 4:
        blocks = acc.shape[0] // BLOCK
        _prepare(row, grid, blocks, table, scales)
        p = row[2 * blocks:]
        for b in range(blocks):
            s = scales[b] * a
            for k in range(16):
                c = p[16 * b + k]
                acc[32 * b + 2 * k] += s * table[c & 15]
                acc[32 * b + 2 * k + 1] += s * table[c >> 4]
        return
    _decode_row(row, bits, grid, a, table, scales, scratch)
    for j in range(acc.shape[0]):
        acc[j] += scratch[j]


@njit(cache=True, nogil=True)
def decode(raw, bits, grid, out):
    """out[r] = the float32 values of row raw[r]. Serial, as palette_kernels.decode (prefill
    calls it between BLAS products)."""
    table = np.empty(grid.shape[0], np.float32)
    scales = np.empty(out.shape[1] // BLOCK, np.float32)
    for r in range(raw.shape[0]):
        _decode_row(raw[r], bits, grid, np.float32(1.0), table, scales, out[r])


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def matvec(raw, x, bits, grid, out):
    """out[r] = decode(raw[r]) . x for every row r: from the partial-sum table where there is
    one (2 and 3 bits), else gathering; at 4 bits two rows at a time (_pair_dot:
    on Gemma 3's 262144 x 640 bpal4 output layer, 2 threads, 31-35 ms a row at a time, 21-22
    ms so; at 3 and 2 bits pairs measured 1.25-1.4x slower on 8192 x 640)."""
    n = raw.shape[0]
    lut = _partial_sums(x, bits, grid)
    if lut.shape[0]:
        for r in prange(n):
            out[r] = _lut_dot(raw[r], bits, lut, x.shape[0] // BLOCK)
        return
    if bits != 4:
        for r in prange(n):
            table = np.empty(grid.shape[0], np.float32)
            scales = np.empty(x.shape[0] // BLOCK, np.float32)
            out[r] = _row_dot(raw[r], x, bits, grid, table, scales)
        return
    for pair in prange(n // 2):
        table = np.empty(grid.shape[0], np.float32)
        scales = np.empty(x.shape[0] // BLOCK, np.float32)
        second_scales = np.empty(x.shape[0] // BLOCK, np.float32)
        r = 2 * pair
        a, b = _pair_dot(raw[r], raw[r + 1], x, bits, grid, table, scales, second_scales)
        out[r], out[r + 1] = a, b
    if n % 2:  # the last row paired with itself: the same arithmetic as in a pair, so a
        # row's product does not depend on where its matrix (or streamed chunk) starts
        table = np.empty(grid.shape[0], np.float32)
        scales = np.empty(x.shape[0] // BLOCK, np.float32)
        out[n - 1] = _pair_dot(raw[n - 1], raw[n - 1], x, bits, grid, table, scales,
                               np.empty(x.shape[0] // BLOCK, np.float32))[0]


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def gate_activations(raw, x, bits, grid, activation, out):
    """out[i] = act(gate_i . x), gate_i being the first row of raw[i]."""
    lut = _partial_sums(x, bits, grid)
    if lut.shape[0]:
        for i in prange(raw.shape[0]):
            out[i] = activate(_lut_dot(raw[i], bits, lut, x.shape[0] // BLOCK), activation)
        return
    for i in prange(raw.shape[0]):
        table = np.empty(grid.shape[0], np.float32)
        scales = np.empty(x.shape[0] // BLOCK, np.float32)
        out[i] = activate(_row_dot(raw[i], x, bits, grid, table, scales), activation)


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def bundled_ffn(raw, rows, x, bits, grid, row_nbytes, activation, gate_act, hidden_act, out):
    """FFN over the bundles raw[rows] for one token; see quant/kernels.bundled_ffn."""
    n = rows.shape[0]
    known = gate_act.shape[0] == n
    parts = max(1, min(n, FFN_PARTS))
    hidden = x.shape[0]
    partial = np.zeros((parts, hidden), np.float32)
    lut = _partial_sums(x, bits, grid)
    for p in prange(parts):
        acc = partial[p]
        scratch = np.empty(hidden, np.float32)
        table = np.empty(grid.shape[0], np.float32)
        scales = np.empty(hidden // BLOCK, np.float32)
        up_scales = np.empty(hidden // BLOCK, np.float32)
        for j in range(p * n // parts, (p + 1) * n // parts):
            i = rows[j]
            up_row = raw[i, row_nbytes:2 * row_nbytes]
            if lut.shape[0]:
                up = _lut_dot(up_row, bits, lut, hidden // BLOCK)
                h = gate_act[j] * up if known else \
                    activate(_lut_dot(raw[i, :row_nbytes], bits, lut, hidden // BLOCK),
                             activation) * up
            elif known:
                h = gate_act[j] * _row_dot(up_row, x, bits, grid, table, scales)
            else:
                gate, up = _pair_dot(raw[i, :row_nbytes], up_row, x, bits, grid, table,
                                     scales, up_scales)
                h = activate(gate, activation) * up
            hidden_act[j] = h
            if h != 0.0:
                _add_scaled_row(raw[i, 2 * row_nbytes:3 * row_nbytes], h, bits, grid, table,
                                scales, acc, scratch)
    sum_parts(partial, out)


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
