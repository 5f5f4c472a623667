"""Fused numba kernels of the block-scaled palette codecs (bpal4, bpal3, bpal2): products
straight from scale + index bytes.

A row (quant/codecs.py) is [scales: one float16 per BLOCK weights][codes]. At 4 and 2 bits
the codes are b-bit indices packed little-endian, 8 in b bytes, as the per-row palettes pack
them; at 3 bits they are two planes: the low 2 bits of every code packed as at 2 bits, then
the high bit of every code, 8 to a byte (lowest first). The codec's table of values (the
same for every row) is computed by `cubic` = (d3, d2, d1, d0, high): the value of code c is
((d3 c + d2) c + d1) c + d0, at 3 bits the cubic in the low 2 bits plus `high` times the
high bit.

Every kernel computes each weight from the cubic (three multiply-adds) instead of gathering
it from the table: the loops then run over whole rows in SIMD registers, where a gather
does not vectorize. At 2 and 3 bits a row's codes are first unpacked a byte each (the high
bits, 8 at a time, with a 64-bit multiply that spreads a byte's bits into 8 bytes).
Measured on 8192 x 640 / Gemma 3's 262144 x 640 output layer, 2 threads, AMD EPYC
(AVX-512), against what these kernels did before (a scratch script, alternating, medians of
11): 4 bits, gathering from the table 0.65 / 20.8 ms, from the cubic 0.23 / 7.0 (int4's
numba kernel 0.26 / 8.1); 2 bits, from tables of partial sums (T-MAC's idea: for every
byte of codes, the sum of its values times x for each of its 256 values) 0.28-0.36 /
7.9-8.0 ms, from the cubic 0.19-0.21 / 5.7-6.3; 3 bits, partial sums of the two planes
0.40-0.50 / 11.1-13.5, from the cubic 0.30-0.32 / 9.2-9.9 (the high bit folded into the
code before the cubic: 0.44 / 14.3; the high plane by partial sums beside the cubic: 12.5).
Scratch allocated per row instead of per range of rows doubled the 2- and 3-bit times. On
Gemma 3's 2048-neuron FFN down, one thread, adding rows from the cubic took 4 bits 0.48 ->
0.24 ms, 3 bits 0.40 -> 0.31, 2 bits -> 0.25. A row's product depends on its bytes and x
alone, never on the rows beside it. Same entry points and conventions as quant/kernels.py
and quant/palette_kernels.py.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .block_palette_fit import BLOCK
from .kernels import FFN_PARTS, activate, sum_parts
from .palette_kernels import half_to_float

_ONES = np.uint64(0x0101010101010101)  # a 1 in every byte
_BIT_OF_BYTE = np.uint64(0x8040201008040201)  # bit k of byte k
_SEVENS = np.uint64(0x7F7F7F7F7F7F7F7F)
PARTS = 256  # row ranges of matvec and gate_activations, each with its own scratch: enough
# for numba's threads to share the work evenly


@njit(cache=True, inline="always")
def _byte(row, at, j):
    """row[at + j] for an unsigned offset `at`: indices numba knows are not negative, so it
    does not check them, and the loops reading them vectorize (rows are read from the whole
    bundle row at an offset, never from a slice of it, whose layout numba does not know)."""
    return row[at + np.uint64(j)]


@njit(cache=True, inline="always")
def _scales(row, at, blocks, a, scales):
    """scales[b] = a times the block scales of the encoded row at row[at:]."""
    for b in range(blocks):
        scales[b] = half_to_float(np.uint16(_byte(row, at, 2 * b)) |
                                  (np.uint16(_byte(row, at, 2 * b + 1)) << 8)) * a


@njit(cache=True, inline="always", fastmath=True)
def _weight(index, d3, d2, d1, d0):
    """The value of a code (at 3 bits, of its low 2 bits) from the codec's cubic. The
    coefficients are passed as scalars: read from their array inside a loop that stores to
    acc, they would be reloaded every time."""
    u = np.float32(index)
    return ((d3 * u + d2) * u + d1) * u + d0


@njit(cache=True, inline="always")
def _unpack(row, start, n, codes):
    """codes[:n] = the n 2-bit codes (at 3 bits the low plane) in row[start:] (start
    unsigned), one byte each."""
    for j in range(n // 4):
        b = row[start + np.uint64(j)]
        codes[4 * j] = b & 3
        codes[4 * j + 1] = (b >> 2) & 3
        codes[4 * j + 2] = (b >> 4) & 3
        codes[4 * j + 3] = b >> 6


@njit(cache=True, inline="always")
def _unpack_high(row, start, n, high):
    """high[:n] = the high bits, 0 or 1, one byte each, of a 3-bit row whose high plane is
    at row[start:], eight at a time: byte * ONES puts a copy of it in every byte, the mask
    keeps bit k of byte k, and adding 0x7F carries any set bit into bit 7."""
    wide = high.view(np.uint64)
    for m in range(n // 8):
        spread = (np.uint64(row[start + np.uint64(m)]) * _ONES) & _BIT_OF_BYTE
        wide[m] = ((spread + _SEVENS) >> np.uint64(7)) & _ONES


# The dot products below run over a whole row, each value's product multiplied by its
# block's scale (scales[j >> shift]): a loop per block (sum a block, then scale it) measured
# slower (4 bits, 8192 x 640, 2 threads: 0.29 ms against 0.22; gathering, one thread, 3x).

@njit(cache=True, inline="always", fastmath=True)
def _row_dot(row, at, x, bits, cubic, scales, codes, high):
    """Dot product of the encoded row at row[at:] with x (`scales`, `codes` and `high` are
    scratch: the block scales, and at 2 and 3 bits the unpacked codes and high bits)."""
    blocks = x.shape[0] // BLOCK
    _scales(row, at, blocks, np.float32(1.0), scales)
    p = at + np.uint64(2 * blocks)
    d3, d2, d1, d0 = cubic[0], cubic[1], cubic[2], cubic[3]
    acc = np.float32(0.0)
    if bits == 4:
        for j in range(x.shape[0] // 2):
            c = _byte(row, p, j)
            acc += (_weight(c & 15, d3, d2, d1, d0) * x[2 * j]
                    + _weight(c >> 4, d3, d2, d1, d0) * x[2 * j + 1]) * scales[j >> 4]
        return acc
    _unpack(row, p, x.shape[0], codes)
    if bits == 2:
        for k in range(x.shape[0]):
            acc += _weight(codes[k], d3, d2, d1, d0) * x[k] * scales[k >> 5]
        return acc
    _unpack_high(row, p + np.uint64(x.shape[0] // 4), x.shape[0], high)
    step = cubic[4]
    for k in range(x.shape[0]):
        acc += (_weight(codes[k], d3, d2, d1, d0) + step * np.float32(high[k])) * x[k] * \
            scales[k >> 5]
    return acc


@njit(cache=True, inline="always", fastmath=True)
def _pair_dot(row, at, other_row, other_at, x, bits, cubic, scales, other_scales, codes, high):
    """(row . x, other row . x) for two encoded rows (at row[at:], other_row[other_at:]); at
    4 bits in one pass over x (each x value loaded once for both: the FFN's gate and up
    rows, or neighbouring rows of a matrix). Measured with 4-bit gathers on Gemma 3's
    2048-neuron FFN, 2 threads: the bundled kernel 1.1 ms with two _row_dot calls, 0.6 ms
    with this; from the cubic, on 262144 x 640, 6.5 ms against 6.8 a row at a time."""
    if bits != 4:
        return (_row_dot(row, at, x, bits, cubic, scales, codes, high),
                _row_dot(other_row, other_at, x, bits, cubic, scales, codes, high))
    blocks = x.shape[0] // BLOCK
    _scales(row, at, blocks, np.float32(1.0), scales)
    _scales(other_row, other_at, blocks, np.float32(1.0), other_scales)
    p, q = at + np.uint64(2 * blocks), other_at + np.uint64(2 * blocks)
    d3, d2, d1, d0 = cubic[0], cubic[1], cubic[2], cubic[3]
    a, b = np.float32(0.0), np.float32(0.0)
    for j in range(x.shape[0] // 2):
        x0, x1 = x[2 * j], x[2 * j + 1]
        c, d = _byte(row, p, j), _byte(other_row, q, j)
        a += (_weight(c & 15, d3, d2, d1, d0) * x0
              + _weight(c >> 4, d3, d2, d1, d0) * x1) * scales[j >> 4]
        b += (_weight(d & 15, d3, d2, d1, d0) * x0
              + _weight(d >> 4, d3, d2, d1, d0) * x1) * other_scales[j >> 4]
    return a, b


@njit(cache=True, inline="always", fastmath=True)
def _add_scaled_row(row, start, a, bits, cubic, scales, codes, high, acc, overwrite):
    """acc += a * decode(the encoded row at row[start:]), or acc = a * decode(...) where
    `overwrite`, a block at a time. Gemma 3's 2048-neuron FFN down at 4 bits, one thread:
    gathering from the levels 0.48 ms, computing 0.29 ms. What keeps it vectorized (each
    measured): the coefficients and the block scales in scalars and a float32 array before
    the loop, and the bytes read from the whole bundle row at an unsigned offset (a slice of
    the row has a layout numba cannot vectorize over, and a signed offset makes it check for
    negative indices: 0.37-0.86 ms). At 2 and 3 bits the codes are unpacked first
    (unpacking in the same loop: 3 bits 0.85 ms, revision 2's packing)."""
    blocks = acc.shape[0] // BLOCK
    at = np.uint64(start)
    _scales(row, at, blocks, a, scales)
    at += np.uint64(2 * blocks)
    d3, d2, d1, d0, step = cubic[0], cubic[1], cubic[2], cubic[3], cubic[4]
    if bits != 4:
        _unpack(row, at, acc.shape[0], codes)
    if bits == 3:
        _unpack_high(row, at + np.uint64(acc.shape[0] // 4), acc.shape[0], high)
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
                acc[BLOCK * b + k] += s * (_weight(codes[BLOCK * b + k], d3, d2, d1, d0)
                                           + step * np.float32(high[BLOCK * b + k]))
        else:
            for k in range(BLOCK):
                acc[BLOCK * b + k] += s * _weight(codes[BLOCK * b + k], d3, d2, d1, d0)


@njit(cache=True, inline="always")
def _scratch(cols):
    """Per-thread scratch of the kernels for rows of `cols` weights: block scales (two
    rows'), codes and high bits."""
    return (np.empty(cols // BLOCK, np.float32), np.empty(cols // BLOCK, np.float32),
            np.empty(cols, np.uint8), np.empty(cols, np.uint8))


@njit(cache=True, nogil=True)
def decode(raw, bits, cubic, out):
    """out[r] = the float32 values of row raw[r]. Serial, as palette_kernels.decode (prefill
    calls it between BLAS products)."""
    scales, _, codes, high = _scratch(out.shape[1])
    for r in range(raw.shape[0]):
        _add_scaled_row(raw[r], 0, np.float32(1.0), bits, cubic, scales, codes, high, out[r],
                        True)


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def matvec(raw, x, bits, cubic, out):
    """out[r] = decode(raw[r]) . x for every row r; at 4 bits two rows at a time
    (_pair_dot). Rows are split into PARTS ranges, each with its own scratch."""
    n = raw.shape[0]
    start = np.uint64(0)
    units = (n + 1) // 2 if bits == 4 else n  # pairs of rows at 4 bits
    parts = max(1, min(units, PARTS))
    for part in prange(parts):
        scales, second_scales, codes, high = _scratch(x.shape[0])
        for u in range(part * units // parts, (part + 1) * units // parts):
            if bits != 4:
                out[u] = _row_dot(raw[u], start, x, bits, cubic, scales, codes, high)
                continue
            r = 2 * u
            # an odd count's last row is paired with itself, through this same code: the
            # compiler may order a sum differently in a second copy of it, and a row's
            # product must not depend on where its matrix (or streamed chunk) starts
            second = min(r + 1, n - 1)
            a, b = _pair_dot(raw[r], start, raw[second], start, x, bits, cubic, scales,
                             second_scales, codes, high)
            out[r] = a
            out[second] = b


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def gate_activations(raw, x, bits, cubic, activation, out):
    """out[i] = act(gate_i . x), gate_i being the first row of raw[i]."""
    n = raw.shape[0]
    parts = max(1, min(n, PARTS))
    for part in prange(parts):
        scales, _, codes, high = _scratch(x.shape[0])
        for i in range(part * n // parts, (part + 1) * n // parts):
            out[i] = activate(_row_dot(raw[i], np.uint64(0), x, bits, cubic, scales, codes,
                                       high), activation)


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def bundled_ffn(raw, rows, x, bits, cubic, row_nbytes, activation, gate_act, hidden_act, out):
    """FFN over the bundles raw[rows] for one token; see quant/kernels.bundled_ffn."""
    n = rows.shape[0]
    known = gate_act.shape[0] == n
    parts = max(1, min(n, FFN_PARTS))
    hidden = x.shape[0]
    partial = np.zeros((parts, hidden), np.float32)
    for p in prange(parts):
        acc = partial[p]
        scales, up_scales, codes, high = _scratch(hidden)
        for j in range(p * n // parts, (p + 1) * n // parts):
            bundle, up_at = raw[rows[j]], np.uint64(row_nbytes)
            if known:
                h = gate_act[j] * _row_dot(bundle, up_at, x, bits, cubic, scales, codes, high)
            else:
                gate, up = _pair_dot(bundle, np.uint64(0), bundle, up_at, x, bits, cubic,
                                     scales, up_scales, codes, high)
                h = activate(gate, activation) * up
            hidden_act[j] = h
            if h != 0.0:
                _add_scaled_row(bundle, 2 * row_nbytes, h, bits, cubic, scales, codes, high,
                                acc, False)
    sum_parts(partial, out)


def warm_up(bits: int, cubic: np.ndarray) -> None:
    """Load (or compile) every kernel now (see quant/kernels.warm_up)."""
    x = np.zeros(BLOCK, np.float32)
    out = np.zeros(1, np.float32)
    nbytes = 2 + BLOCK * bits // 8
    raw = np.zeros((1, nbytes), np.uint8)
    matvec(raw, x, bits, cubic, out)
    decode(raw, bits, cubic, np.zeros((1, BLOCK), np.float32))
    bundles = np.zeros((1, 3 * nbytes), np.uint8)
    for gate_act in (np.zeros(0, np.float32), np.zeros(1, np.float32)):
        bundled_ffn(bundles, np.zeros(1, np.int64), x, bits, cubic, nbytes, 0, gate_act,
                    np.zeros(1, np.float32), np.zeros(BLOCK, np.float32))
    gate_activations(bundles, x, bits, cubic, 0, out)
