"""Fused numba kernels of the block-scaled palette codecs (bpal4, bpal3, bpal2): products
straight from scale + index bytes.

A row (quant/codecs.py) is [scales: one float16 per BLOCK weights][codes]. At 4 and 2 bits
the codes are b-bit indices packed little-endian, 8 in b bytes, as the per-row palettes pack
them; at 3 bits they are two planes: the low 2 bits of every code packed as at 2 bits, then
the high bit of every code, 8 to a byte (lowest first). The table (`levels`, 2^b float32
values by code) is the codec's, the same for every row, and `cubic` computes it: the cubic
in the code, at 3 bits the cubic in the low bits plus `high` times the high bit. Dot
products gather from the table (a small array that stays in L1), while the loops that add
decoded rows (the FFN's down columns, decoding for prefill) compute each weight from the
cubic, which vectorizes where a gather does not (Gemma 3's 2048-neuron FFN down, one thread:
4 bits 0.48 -> 0.24 ms, 3 bits 0.40 -> 0.31, 2 bits -> 0.25).

At 2 and 3 bits the dot products read tables of partial sums instead (T-MAC's idea, here
over the codec's levels): built once per input vector, they hold, for every byte of codes
(four 2-bit codes or low planes; eight high bits), the sum of its values times x over the
weights it covers, for each of its 256 values, so a row costs one load per 4 weights at 2
bits, 3 per 8 at 3 bits, and no multiply but one per block. This is why bpal3's table is
a sum of a low and a high part: its bytes hold whole groups, no code straddles two, and the
high plane's table is 8 weights wide. Measured on 8192 x 640, 2 threads (Intel): 2 bits
0.68 -> 0.37 ms, 3 bits 0.92 (gathering) -> 0.73 (a table of 6-bit pairs of indices packed
8 in 3 bytes); 4 bits gathering 0.54 (a table of byte sums measured 2x slower there). On
Gemma 3's 262144 x 640 output layer (AMD EPYC, 2 threads) the two planes take 10.8 ms,
bpal4 20.2, bpal2 7.6 (the pairs took 1.1-1.2x bpal4's time). The tables are used while
they stay within LUT_MAX_BYTES (in the caches): the choice depends on the codec and the row
width only, so a row's product never depends on the rows beside it. Same entry points and
conventions as quant/kernels.py and quant/palette_kernels.py.
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
def _prepare(row, at, levels, blocks, table, scales):
    """table = levels (a stack copy the gathers read), scales[b] = the block scales of the
    encoded row at row[at:]."""
    for i in range(levels.shape[0]):
        table[i] = levels[i]
    for b in range(blocks):
        scales[b] = half_to_float(np.uint16(_byte(row, at, 2 * b)) |
                                  (np.uint16(_byte(row, at, 2 * b + 1)) << 8))


@njit(cache=True)
def lut_entries(bits, cols):
    """float32 entries of the partial-sum tables for rows of `cols` weights (256 per byte of
    2-bit codes or low planes, then at 3 bits 256 per byte of high bits); 0 where the
    kernels gather from the levels instead."""
    entries = cols * 64 if bits == 2 else cols * 96 if bits == 3 else 0
    return entries if 4 * entries <= LUT_MAX_BYTES else 0


@njit(cache=True, fastmath=True)
def _build_lut(x, bits, levels, lut):
    """lut = the partial sums of the levels times x, for every byte of codes (see above):
    the 2-bit codes' (at 3 bits the low planes', whose codes 0..3 have no high bit), then
    at 3 bits the high bits', from cols * 64 on."""
    for j in range(x.shape[0] // 4):
        x0, x1, x2, x3 = x[4 * j], x[4 * j + 1], x[4 * j + 2], x[4 * j + 3]
        for c3 in range(4):
            for c2 in range(4):
                t = levels[c3] * x3 + levels[c2] * x2
                for c1 in range(4):
                    u = t + levels[c1] * x1
                    k = (j << 8) + (c3 << 6) + (c2 << 4) + (c1 << 2)
                    for c0 in range(4):
                        lut[k + c0] = levels[c0] * x0 + u
    if bits == 3:  # a byte of high bits: the step times the sum of x where a bit is set
        step = levels[4] - levels[0]
        for m in range(x.shape[0] // 8):
            base = x.shape[0] * 64 + (m << 8)
            lut[base] = 0.0
            for bit in range(8):
                v = step * x[8 * m + bit]
                for below in range(1 << bit):
                    lut[base + (below | (1 << bit))] = lut[base + below] + v


@njit(cache=True)
def _partial_sums(x, bits, levels):
    """The partial-sum table for x, or an empty array where the kernels gather instead."""
    lut = np.empty(lut_entries(bits, x.shape[0]), np.float32)
    if lut.shape[0]:
        _build_lut(x, bits, levels, lut)
    return lut


@njit(cache=True, inline="always", fastmath=True)
def _lut_dot(row, at, bits, lut, blocks):
    """Dot product of the encoded row at row[at:] with the x its table was built from."""
    p = at + np.uint64(2 * blocks)
    q = p + np.uint64(8 * blocks)  # 3 bits: the high plane, after the low one
    high = BLOCK * blocks * 64  # 3 bits: where the high plane's sums start in lut
    acc = np.float32(0.0)
    for b in range(blocks):
        s0, s1, s2, s3 = np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
        for j in range(8 * b, 8 * b + 8, 4):  # 8 bytes of 2-bit codes (low planes) a block
            s0 += lut[(j << 8) | _byte(row, p, j)]
            s1 += lut[((j + 1) << 8) | _byte(row, p, j + 1)]
            s2 += lut[((j + 2) << 8) | _byte(row, p, j + 2)]
            s3 += lut[((j + 3) << 8) | _byte(row, p, j + 3)]
        if bits == 3:  # and 4 bytes of high bits
            m = 4 * b
            s0 += lut[high + ((m << 8) | _byte(row, q, m))]
            s1 += lut[high + (((m + 1) << 8) | _byte(row, q, m + 1))]
            s2 += lut[high + (((m + 2) << 8) | _byte(row, q, m + 2))]
            s3 += lut[high + (((m + 3) << 8) | _byte(row, q, m + 3))]
        acc += half_to_float(np.uint16(_byte(row, at, 2 * b)) |
                             (np.uint16(_byte(row, at, 2 * b + 1)) << 8)) * \
            ((s0 + s1) + (s2 + s3))
    return acc


# The loops below run over a whole row, each value's product multiplied by its block's scale
# (scales[j >> shift]): measured on 8192x640, one thread, this is 1.4x int4's matvec, while a
# loop per block (sum a block, then scale it) is 3x slower than this (LLVM vectorizes the
# flat loop, not the 16-iteration one).

@njit(cache=True, inline="always", fastmath=True)
def _row_dot(row, at, x, bits, levels, table, scales):
    """Dot product of the encoded row at row[at:] with x."""
    blocks = x.shape[0] // BLOCK
    _prepare(row, at, levels, blocks, table, scales)
    p = at + np.uint64(2 * blocks)
    acc = np.float32(0.0)
    if bits == 4:
        for j in range(x.shape[0] // 2):
            c = _byte(row, p, j)
            acc += (table[c & 15] * x[2 * j] + table[c >> 4] * x[2 * j + 1]) * scales[j >> 4]
        return acc
    # rows wider than the partial-sum tables take, at 2 and 3 bits
    if bits == 3:
        q = p + np.uint64(x.shape[0] // 4)
        for m in range(x.shape[0] // 8):
            acc += _planar_dot(row, p, q, m, x, table) * scales[m >> 2]
        return acc
    packed = row[int(p):]
    for j in range(x.shape[0] // 4):
        acc += gather_dot(packed, j, x, bits, table) * scales[j >> 3]
    return acc


@njit(cache=True, inline="always", fastmath=True)
def _planar_dot(row, p, q, m, x, table):
    """Sum of table[code] * x over the 8 weights of group m of a 3-bit row whose low plane
    is at row[p:] and high plane at row[q:]."""
    low = np.uint32(_byte(row, p, 2 * m)) | (np.uint32(_byte(row, p, 2 * m + 1)) << 8)
    high = np.uint32(_byte(row, q, m))
    total = np.float32(0.0)
    for k in range(8):
        total += table[((low >> (2 * k)) & 3) | (((high >> k) & 1) << 2)] * x[8 * m + k]
    return total


@njit(cache=True, inline="always", fastmath=True)
def _pair_dot(row, at, other_row, other_at, x, bits, levels, table, scales, other_scales):
    """(row . x, other row . x) for two encoded rows (at row[at:], other_row[other_at:]) in
    one pass over x (each x value loaded once for both; the FFN's gate and up rows, or
    neighbouring rows of a matrix). Measured on Gemma 3's 2048-neuron bpal4 FFN, 2 threads:
    the bundled kernel 1.1 ms with two _row_dot calls, 0.6 ms with this."""
    blocks = x.shape[0] // BLOCK
    _prepare(row, at, levels, blocks, table, scales)
    _prepare(other_row, other_at, levels, blocks, table, other_scales)
    p, q = at + np.uint64(2 * blocks), other_at + np.uint64(2 * blocks)
    a, b = np.float32(0.0), np.float32(0.0)
    if bits == 4:  # the loop written out for 4 bits: x loaded once for both rows
        for j in range(x.shape[0] // 2):
            x0, x1 = x[2 * j], x[2 * j + 1]
            c, d = _byte(row, p, j), _byte(other_row, q, j)
            a += (table[c & 15] * x0 + table[c >> 4] * x1) * scales[j >> 4]
            b += (table[d & 15] * x0 + table[d >> 4] * x1) * other_scales[j >> 4]
        return a, b
    if bits == 3:
        high, other_high = p + np.uint64(x.shape[0] // 4), q + np.uint64(x.shape[0] // 4)
        for m in range(x.shape[0] // 8):
            a += _planar_dot(row, p, high, m, x, table) * scales[m >> 2]
            b += _planar_dot(other_row, q, other_high, m, x, table) * other_scales[m >> 2]
        return a, b
    packed, other_packed = row[int(p):], other_row[int(q):]
    for j in range(x.shape[0] // 4):
        a += gather_dot(packed, j, x, bits, table) * scales[j >> 3]
        b += gather_dot(other_packed, j, x, bits, table) * other_scales[j >> 3]
    return a, b


@njit(cache=True, inline="always", fastmath=True)
def _weight(index, d3, d2, d1, d0):
    """levels[index] computed from the codec's cubic (quant/codecs.py; at 3 bits the low
    bits' part of it): no gather, so the loops that add decoded rows vectorize (the
    coefficients are passed as scalars: read from their array inside a loop that stores to
    acc, they would be reloaded every time)."""
    u = np.float32(index)
    return ((d3 * u + d2) * u + d1) * u + d0


@njit(cache=True, inline="always")
def _unpack(row, start, bits, n, codes):
    """codes[:n] = the n 2- or 3-bit codes in row[start:] (start unsigned), one byte each."""
    for j in range(n // 4):
        b = row[start + np.uint64(j)]
        codes[4 * j] = b & 3
        codes[4 * j + 1] = (b >> 2) & 3
        codes[4 * j + 2] = (b >> 4) & 3
        codes[4 * j + 3] = b >> 6
    if bits == 3:
        high = start + np.uint64(n // 4)
        for m in range(n // 8):
            b = row[high + np.uint64(m)]
            for k in range(8):
                codes[8 * m + k] |= ((b >> k) & 1) << 2


@njit(cache=True, inline="always", fastmath=True)
def _add_scaled_row(row, start, a, bits, cubic, scales, indices, acc, overwrite):
    """acc += a * decode(the encoded row at row[start:]), or acc = a * decode(...) where
    `overwrite`, a block at a time with each weight computed from the cubic. Gemma 3's
    2048-neuron FFN down at 4 bits, one thread: gathering from the levels 0.48 ms, computing
    0.29 ms. What keeps it vectorized (each measured): the coefficients and the block scales
    in scalars and a float32 array before the loop, and the bytes read from the whole bundle
    row at an unsigned offset (a slice of the row has a layout numba cannot vectorize over,
    and a signed offset makes it check for negative indices: 0.37-0.86 ms). At 2 and 3 bits
    the codes are unpacked into `indices` first (unpacking in the same loop: 3 bits 0.85
    ms, revision 2's packing)."""
    blocks = acc.shape[0] // BLOCK
    at = np.uint64(start)
    for b in range(blocks):
        i = at + np.uint64(2 * b)
        scales[b] = half_to_float(np.uint16(row[i]) | (np.uint16(row[i + np.uint64(1)]) << 8)) * a
    at += np.uint64(2 * blocks)
    d3, d2, d1, d0, high = cubic[0], cubic[1], cubic[2], cubic[3], cubic[4]
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
        elif bits == 3:
            for k in range(BLOCK):
                c = indices[BLOCK * b + k]
                acc[BLOCK * b + k] += s * (_weight(c & 3, d3, d2, d1, d0)
                                           + high * np.float32(c >> 2))
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
def matvec(raw, x, bits, levels, out):
    """out[r] = decode(raw[r]) . x for every row r: from the partial-sum table where there is
    one (2 and 3 bits), else gathering; at 4 bits two rows at a time (_pair_dot:
    on Gemma 3's 262144 x 640 bpal4 output layer, 2 threads, 31-35 ms a row at a time, 21-22
    ms so; at 3 and 2 bits pairs measured 1.25-1.4x slower on 8192 x 640)."""
    n = raw.shape[0]
    start = np.uint64(0)
    lut = _partial_sums(x, bits, levels)
    if lut.shape[0]:
        for r in prange(n):
            out[r] = _lut_dot(raw[r], np.uint64(0), bits, lut, x.shape[0] // BLOCK)
        return
    if bits != 4:
        for r in prange(n):
            table = np.empty(levels.shape[0], np.float32)
            scales = np.empty(x.shape[0] // BLOCK, np.float32)
            out[r] = _row_dot(raw[r], np.uint64(0), x, bits, levels, table, scales)
        return
    for pair in prange((n + 1) // 2):
        table = np.empty(levels.shape[0], np.float32)
        scales = np.empty(x.shape[0] // BLOCK, np.float32)
        second_scales = np.empty(x.shape[0] // BLOCK, np.float32)
        r = 2 * pair
        # an odd count's last row is paired with itself, through this same code: the
        # compiler may order a sum differently in a second copy of it, and a row's product
        # must not depend on where its matrix (or streamed chunk) starts
        second = min(r + 1, n - 1)
        a, b = _pair_dot(raw[r], start, raw[second], start, x, bits, levels, table, scales,
                         second_scales)
        out[r] = a
        out[second] = b


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def gate_activations(raw, x, bits, levels, activation, out):
    """out[i] = act(gate_i . x), gate_i being the first row of raw[i]."""
    lut = _partial_sums(x, bits, levels)
    if lut.shape[0]:
        for i in prange(raw.shape[0]):
            out[i] = activate(_lut_dot(raw[i], np.uint64(0), bits, lut, x.shape[0] // BLOCK),
                              activation)
        return
    for i in prange(raw.shape[0]):
        table = np.empty(levels.shape[0], np.float32)
        scales = np.empty(x.shape[0] // BLOCK, np.float32)
        out[i] = activate(_row_dot(raw[i], np.uint64(0), x, bits, levels, table, scales),
                          activation)


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def bundled_ffn(raw, rows, x, bits, levels, cubic, row_nbytes, activation, gate_act, hidden_act,
                out):
    """FFN over the bundles raw[rows] for one token; see quant/kernels.bundled_ffn."""
    n = rows.shape[0]
    known = gate_act.shape[0] == n
    parts = max(1, min(n, FFN_PARTS))
    hidden = x.shape[0]
    partial = np.zeros((parts, hidden), np.float32)
    lut = _partial_sums(x, bits, levels)
    for p in prange(parts):
        acc = partial[p]
        indices = np.empty(hidden, np.uint8)
        table = np.empty(levels.shape[0], np.float32)
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
                h = gate_act[j] * _row_dot(bundle, up_at, x, bits, levels, table, scales)
            else:
                gate, up = _pair_dot(bundle, np.uint64(0), bundle, up_at, x, bits, levels, table,
                                     scales, up_scales)
                h = activate(gate, activation) * up
            hidden_act[j] = h
            if h != 0.0:
                _add_scaled_row(bundle, 2 * row_nbytes, h, bits, cubic, scales, indices, acc,
                                False)
    sum_parts(partial, out)


def warm_up(bits: int, levels: np.ndarray, cubic: np.ndarray) -> None:
    """Load (or compile) every kernel now (see quant/kernels.warm_up)."""
    x = np.zeros(BLOCK, np.float32)
    out = np.zeros(1, np.float32)
    nbytes = 2 + BLOCK * bits // 8
    raw = np.zeros((1, nbytes), np.uint8)
    matvec(raw, x, bits, levels, out)
    decode(raw, bits, cubic, np.zeros((1, BLOCK), np.float32))
    bundles = np.zeros((1, 3 * nbytes), np.uint8)
    for gate_act in (np.zeros(0, np.float32), np.zeros(1, np.float32)):
        bundled_ffn(bundles, np.zeros(1, np.int64), x, bits, levels, cubic, nbytes, 0, gate_act,
                    np.zeros(1, np.float32), np.zeros(BLOCK, np.float32))
    gate_activations(bundles, x, bits, levels, 0, out)
