"""Store codecs: how a float32 matrix row becomes bytes on flash, and how to compute with them.

Every codec stores rows independently (one FFN neuron's gate row, up row and down column can
be bundled together, an embedding row read alone), though a fitting encoder may choose one
row's bytes knowing the others (the palettes' error feedback). A codec is a registered class
(gguf-py's quants.py is the model) that owns its byte layout, encode/decode and its kernels
for one token; the store, the planner, the runtime and the CLI learn codecs from `CODECS`:

  f16   payload = float16 values, no scales                          16 bits/weight
  int8  scale = amax/127 per group of 64 (float32), int8 values       8.5 bits/weight
  int4  scale = amax/7 per group of 64 (float32), values in -8..7
        packed two per byte (low nibble first, stored +8)             4.5 bits/weight
  int4fit
        int4's bytes, fitted to calibration inputs as the bpal codecs
        are (quant/block_palette_fit.py)                             4.5 bits/weight
  int4g128
        int4 with a scale per group of 128 (no fused kernels: for
        resident matrices, which onnxruntime multiplies faster)       4.25 bits/weight
  pal4, pal3, pal2
        a palette per row: a table of 2^b float16 values and a b-bit
        index per weight (8 indices in b bytes)   b + 2^(b+4)/cols bits/weight
        (4.4, 3.2, 2.1 on 640-wide rows)
  bpal4, bpal3, bpal2
        block-scaled palettes: one fixed table of 2^b values for all rows
        (a cubic in the index), a float16 scale per block of 32 and a b-bit
        index per weight (indices packed as the palettes'; bpal3's in a
        2-bit plane and a 1-bit plane, its table a sum of the two)
                                                            b + 0.5 bits/weight

A row of a grouped codec is `[scales][payload]`; scales are float32 (not float16) so the
numba kernels (quant/kernels.py) read them directly. A palette row is `[table][indices]`,
a block-scaled palette row `[float16 scales][indices]`; both are fitted to the inputs the
matrix multiplies when calibration statistics are given (`InputStats`, see
quant/palette_fit.py and quant/block_palette_fit.py). On Gemma 3 270M (whose GGUF holds
32-weight blocks) a scale per block halves to thirds the KL of a table per row at the same
bits (docs/benchmarks.md). Codecs without fused kernels (f16) are
computed by decoding a block of rows at a time, as are several tokens (prefill): that, and
which kernels run, is a backend's choice (backends/).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from . import block_palette_fit, block_palette_kernels, kernels, palette_fit, palette_kernels
from .kernels import GROUP

ACTIVATION_KINDS = {"gelu_tanh": 0, "silu": 1}  # the kernels' activation codes
_NONE = np.zeros(0, np.float32)  # "gate activations not known" for the fused kernel


@dataclass(frozen=True)
class InputStats:
    """What calibration measured of the inputs x a matrix multiplies: E[x_j^2] (cols,) and,
    where collected, E[x x^T] (cols, cols). Codecs that fit to data use them."""

    second_moment: np.ndarray
    hessian: np.ndarray | None = None


class Codec:
    """Base class: the byte layout of one encoded row, and computing from encoded rows.

    Codecs with `fused` kernels compute one token straight from their bytes: `matvec` for a
    matrix, `bundle_ffn` and `gate_activations` for row-column FFN bundles ([gate row | up
    row | down column], each `row_nbytes(cols)` bytes). Everything else a backend computes
    by decoding (backends/base.py)."""

    name: ClassVar[str]
    bits: ClassVar[int]  # bits per stored value
    # raised whenever the meaning of the bytes changes; a store records the revision of each
    # codec it holds, and one written at another revision is refused (store/reader.py)
    revision: ClassVar[int] = 1
    fused: ClassVar[bool] = False  # whether its one-token kernels read the bytes directly
    fits_inputs: ClassVar[bool] = False  # whether encode() uses calibration's InputStats
    # whether a store of this FFN codec also keeps each down projection by row (grouped along
    # the FFN size), for backends that multiply the dense FFN as matrices: re-encoding the
    # bundles' down columns by row would round the weights a second time
    down_by_row: ClassVar[bool] = False

    def supports(self, cols: int) -> bool:
        return True

    def row_nbytes(self, cols: int) -> int:
        raise NotImplementedError

    def encode(self, rows: np.ndarray, stats: InputStats | None = None) -> np.ndarray:
        """(n, cols) float32 -> (n, row_nbytes) uint8; `stats` of the inputs the rows
        multiply, for codecs that fit to them (others ignore it)."""
        raise NotImplementedError

    def encode_columns(self, columns: np.ndarray, stats: InputStats | None = None
                       ) -> np.ndarray:
        """Like encode, for rows that are a matrix's columns (the FFN's down projection,
        stored by neuron): row i multiplies input i alone, `stats` are of those inputs."""
        return self.encode(columns)

    def decode(self, raw: np.ndarray, cols: int) -> np.ndarray:
        """(n, row_nbytes) uint8 -> (n, cols) float32."""
        raise NotImplementedError

    def decode_reference(self, raw: np.ndarray, cols: int) -> np.ndarray:
        """`decode` in plain numpy (the numpy backend's decoder; what kernels are held to)."""
        return self.decode(raw, cols)

    def warm_up(self) -> None:
        """Load (or compile) the codec's fused kernels now."""

    # Fused one-token kernels, for codecs with `fused` (the cpu backend calls them; the
    # conventions are backends/base.py's operations of the same names).
    def matvec(self, raw: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
        raise NotImplementedError

    def gate_activations(self, raw: np.ndarray, x: np.ndarray, activation: str,
                         out: np.ndarray) -> None:
        raise NotImplementedError

    def bundle_ffn(self, raw: np.ndarray, rows: np.ndarray, x: np.ndarray, activation: str,
                   gate_act: np.ndarray | None, hidden_act: np.ndarray, out: np.ndarray) -> None:
        raise NotImplementedError


CODECS: dict[str, Codec] = {}


def register(codec_class: type[Codec]) -> type[Codec]:
    """Make a codec known to the store, the runtime and the CLI by its name."""
    CODECS[codec_class.name] = codec_class()
    return codec_class


@register
class F16(Codec):
    name, bits = "f16", 16

    def row_nbytes(self, cols: int) -> int:
        return 2 * cols

    def encode(self, rows: np.ndarray, stats: InputStats | None = None) -> np.ndarray:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        return rows.astype(np.float16).view(np.uint8).reshape(len(rows), -1)

    def decode(self, raw: np.ndarray, cols: int) -> np.ndarray:
        raw = np.ascontiguousarray(raw)
        return raw.view(np.float16).reshape(len(raw), cols).astype(np.float32)


class _Grouped(Codec):
    """Symmetric integers with a float32 scale per group of `group` values; fused kernels
    for groups of GROUP (quant/kernels.py)."""

    limit: ClassVar[int]  # largest magnitude stored
    lowest: ClassVar[int]  # most negative value stored
    group: ClassVar[int] = GROUP  # values per scale
    search_scales: ClassVar[bool] = False  # search each group's scale (else amax/limit)
    fused = True

    def supports(self, cols: int) -> bool:
        return cols % self.group == 0

    def _check(self, cols: int) -> None:
        if not self.supports(cols):
            raise ValueError(f"{self.name} needs rows in whole groups of {self.group}, got {cols}")

    def row_nbytes(self, cols: int) -> int:
        return 4 * (cols // self.group) + cols * self.bits // 8

    def encode(self, rows: np.ndarray, stats: InputStats | None = None) -> np.ndarray:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        n, cols = rows.shape
        self._check(cols)
        grouped = rows.reshape(n, -1, self.group)
        scales = np.abs(grouped).max(axis=-1) / self.limit
        safe = np.where(scales > 0, scales, 1.0)[..., None]
        q = np.clip(np.rint(grouped / safe), self.lowest, self.limit).astype(np.int8)
        if self.search_scales:
            scales, q = self._searched(grouped, q)
        payload = self._pack(q.reshape(n, cols))
        return np.concatenate([scales.astype(np.float32).view(np.uint8).reshape(n, -1),
                               payload], axis=1)

    def _searched(self, grouped: np.ndarray, q: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
        """Per group, the least-squares scale of the best of several roundings: amax/limit's
        (so never worse than it), and ones mapping the largest-magnitude value to about
        `lowest` (-8: the asymmetric range's extra level) and at 6 nearby steps, as llama.cpp's
        quantizers search (make_qx_quants; its 19 steps measured no better here)."""
        x = grouped
        peak = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)  # signed
        safe_peak = np.where(peak != 0, peak, np.float32(1))

        def fit(qs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            sumqx, sumq2 = (x * qs).sum(-1), (qs * qs).sum(-1)
            ok = sumq2 > 0
            return np.where(ok, sumqx / np.where(ok, sumq2, 1), 0), \
                np.where(ok, sumqx * sumqx / np.where(ok, sumq2, 1), 0)

        best_q = q.astype(np.float32)
        best_scale, best_gain = fit(best_q)  # gain: the squared error it removes
        for step in range(-9, 10, 3):
            inverse = (self.lowest - np.float32(0.1 * step)) / safe_peak
            trial = np.clip(np.rint(x * inverse), self.lowest, self.limit)
            scale, gain = fit(trial)
            better = gain > best_gain
            best_q = np.where(better[..., None], trial, best_q)
            best_scale = np.where(better, scale, best_scale)
            best_gain = np.where(better, gain, best_gain)
        return best_scale.astype(np.float32), best_q.astype(np.int8)

    def decode(self, raw: np.ndarray, cols: int) -> np.ndarray:
        raw = np.ascontiguousarray(raw)
        n, ng = raw.shape[0], cols // self.group
        scales = raw[:, :4 * ng].view(np.float32).reshape(n, ng, 1)
        q = self._unpack(raw[:, 4 * ng:], cols).reshape(n, ng, self.group)
        return (q * scales).reshape(n, cols)

    def _pack(self, q: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _unpack(self, payload: np.ndarray, cols: int) -> np.ndarray:
        raise NotImplementedError

    def warm_up(self) -> None:
        kernels.warm_up(self.bits)

    def matvec(self, raw, x, out) -> None:
        kernels.matvec(raw, x, len(x) // GROUP, self.bits, out)

    def gate_activations(self, raw, x, activation, out) -> None:
        kernels.gate_activations(raw, x, len(x) // GROUP, self.bits,
                                 ACTIVATION_KINDS[activation], out)

    def bundle_ffn(self, raw, rows, x, activation, gate_act, hidden_act, out) -> None:
        known = _NONE if gate_act is None else np.ascontiguousarray(gate_act, np.float32)
        kernels.bundled_ffn(raw, rows, x, len(x) // GROUP, self.bits, self.row_nbytes(len(x)),
                            ACTIVATION_KINDS[activation], known, hidden_act, out)


@register
class Int8(_Grouped):
    name, bits, limit, lowest = "int8", 8, 127, -127

    def _pack(self, q: np.ndarray) -> np.ndarray:
        return q.view(np.uint8)

    def _unpack(self, payload: np.ndarray, cols: int) -> np.ndarray:
        return payload.view(np.int8)


@register
class Int4(_Grouped):
    name, bits, limit, lowest = "int4", 4, 7, -8
    # re-encoding down by row in int4 cost Gemma 3 270M KL 0.26 and 20 points of top-1
    # (int8 instead: 0.0117), and int8 holds 1.9x the bytes a token reads (docs/benchmarks.md)
    down_by_row = True
    # a searched scale per group: Gemma 3 270M's int4 store KL 0.596 vs 0.752 at amax/7
    # against the source, top-1 62.4% vs 58.4% (docs/benchmarks.md)
    search_scales = True

    def _pack(self, q: np.ndarray) -> np.ndarray:
        nibbles = (q + 8).astype(np.uint8)
        return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)

    def _unpack(self, payload: np.ndarray, cols: int) -> np.ndarray:
        q = np.empty((len(payload), cols), np.int8)
        q[:, 0::2] = (payload & 0x0F).astype(np.int8) - 8
        q[:, 1::2] = (payload >> 4).astype(np.int8) - 8
        return q


class _FittedToBlocks(Codec):
    """Encoding by quant/block_palette_fit.py: a scale per block of `scale_blocks` and an
    index into `grid` per weight, fitted to the inputs' statistics where given. Subclasses
    say how rows are checked (`_check`) and written (`_row_bytes`)."""

    grid: ClassVar[np.ndarray]  # the values ascending (what the fit chooses from)
    scale_blocks: ClassVar[block_palette_fit.ScaleBlocks]

    def _check(self, cols: int) -> None:
        raise NotImplementedError

    def _row_bytes(self, scales: np.ndarray, indices: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def encode(self, rows: np.ndarray, stats: InputStats | None = None) -> np.ndarray:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        self._check(rows.shape[1])
        grid = self.grid.astype(np.float64)
        parts = [block_palette_fit.fit(rows[s:s + palette_fit.ROWS_PER_BLOCK], grid,
                                       None if stats is None else stats.second_moment,
                                       None if stats is None else stats.hessian,
                                       self.scale_blocks)
                 for s in range(0, len(rows), palette_fit.ROWS_PER_BLOCK)]
        return np.concatenate([self._row_bytes(*part) for part in parts]) if parts else \
            np.zeros((0, self.row_nbytes(rows.shape[1])), np.uint8)

    def encode_columns(self, columns: np.ndarray, stats: InputStats | None = None
                       ) -> np.ndarray:
        if stats is None or stats.hessian is None:
            return self.encode(columns)
        self._check(columns.shape[1])
        return self._row_bytes(*block_palette_fit.fit_columns(
            columns, self.grid.astype(np.float64), stats.hessian, self.scale_blocks))


@register
class Int4Fit(_FittedToBlocks, Int4):
    """int4's bytes, fitted to calibration data: int4's kernels and onnxruntime's MatMulNBits
    run it unchanged (backends/onnx_matmul.py maps it), but each group's scale and values
    come from the bpal codecs' fit (quant/block_palette_fit.py) over int4's grid -8 .. 7:
    scales searched weighted by E[x_j^2], values with error feedback through E[x x^T], scales
    refitted by least squares. Costs a calibration pass at convert; int4 rounds to nearest."""

    name = "int4fit"
    fits_inputs = True
    search_scales = False  # int4's search is not used: the fit searches its own
    grid = np.arange(-8, 8, dtype=np.float64)  # index i is the value i - 8
    scale_blocks = block_palette_fit.ScaleBlocks(GROUP, np.float32)

    _check = Int4._check  # not _FittedToBlocks' (which comes first in the lookup order)

    def _row_bytes(self, scales: np.ndarray, indices: np.ndarray) -> np.ndarray:
        q = indices.astype(np.int8) - 8  # as int4 holds them
        return np.concatenate([scales.astype(np.float32).view(np.uint8), self._pack(q)],
                              axis=1)


@register
class Int4G128(Int4):
    """int4 with a scale per 128 values: 4.25 bits/weight. For resident matrices on the cpu
    backend, where onnxruntime multiplies 128-value blocks ~20% faster than 64-value ones
    (docs/benchmarks.md); no fused kernels (streamed rows are decoded a block at a time)."""

    name, group, fused = "int4g128", 128, False


def pack_indices(indices: np.ndarray, bits: int) -> np.ndarray:
    """(n, cols) indices -> (n, cols * bits / 8) bytes: each run of 8 indices is one
    little-endian integer of `bits` bytes, index i at bit bits * i."""
    n, cols = indices.shape
    words = np.zeros((n, cols // 8), np.uint32)
    for i in range(8):
        words |= indices[:, i::8].astype(np.uint32) << np.uint32(bits * i)
    return words.view(np.uint8).reshape(n, cols // 8, 4)[:, :, :bits].reshape(n, -1)


def unpack_indices(payload: np.ndarray, cols: int, bits: int) -> np.ndarray:
    """The inverse of pack_indices: (n, cols) int64 indices."""
    n = len(payload)
    padded = np.zeros((n, cols // 8, 4), np.uint8)
    padded[:, :, :bits] = payload.reshape(n, cols // 8, bits)
    words = padded.view(np.uint32)[:, :, 0]
    indices = np.empty((n, cols), np.int64)
    for i in range(8):
        indices[:, i::8] = (words >> np.uint32(bits * i)) & np.uint32((1 << bits) - 1)
    return indices


class _Palette(Codec):
    """A table of 2^bits float16 values per row and a bits-wide index per weight, packed
    little-endian (8 indices in `bits` bytes); fused kernels in quant/palette_kernels.py."""

    fused = True
    fits_inputs = True

    @property
    def entries(self) -> int:
        return 1 << self.bits

    def supports(self, cols: int) -> bool:
        return cols % 8 == 0

    def row_nbytes(self, cols: int) -> int:
        return 2 * self.entries + cols * self.bits // 8

    def encode(self, rows: np.ndarray, stats: InputStats | None = None) -> np.ndarray:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        n, cols = rows.shape
        if not self.supports(cols):
            raise ValueError(f"{self.name} needs rows in whole groups of 8, got {cols}")
        tables, indices = palette_fit.fit(rows, self.entries,
                                          None if stats is None else stats.second_moment,
                                          None if stats is None else stats.hessian)
        return np.concatenate([tables.astype(np.float16).view(np.uint8),
                               pack_indices(indices, self.bits)], axis=1)

    def encode_columns(self, columns: np.ndarray, stats: InputStats | None = None
                       ) -> np.ndarray:
        if stats is None or stats.hessian is None:
            return self.encode(columns)
        if not self.supports(columns.shape[1]):
            raise ValueError(f"{self.name} needs rows in whole groups of 8, got "
                             f"{columns.shape[1]}")
        tables, indices = palette_fit.fit_columns(columns, self.entries, stats.hessian)
        return np.concatenate([tables.astype(np.float16).view(np.uint8),
                               pack_indices(indices, self.bits)], axis=1)

    def decode(self, raw: np.ndarray, cols: int) -> np.ndarray:
        out = np.empty((len(raw), cols), np.float32)
        palette_kernels.decode(np.ascontiguousarray(raw), self.bits, out)
        return out

    def decode_reference(self, raw: np.ndarray, cols: int) -> np.ndarray:
        raw = np.ascontiguousarray(raw)
        tables = raw[:, :2 * self.entries].view(np.float16).astype(np.float32)
        indices = unpack_indices(raw[:, 2 * self.entries:], cols, self.bits)
        return np.take_along_axis(tables, indices, axis=1)

    def warm_up(self) -> None:
        palette_kernels.warm_up(self.bits)

    def matvec(self, raw, x, out) -> None:
        palette_kernels.matvec(raw, x, self.bits, out)

    def gate_activations(self, raw, x, activation, out) -> None:
        palette_kernels.gate_activations(raw, x, self.bits, ACTIVATION_KINDS[activation], out)

    def bundle_ffn(self, raw, rows, x, activation, gate_act, hidden_act, out) -> None:
        known = _NONE if gate_act is None else np.ascontiguousarray(gate_act, np.float32)
        palette_kernels.bundled_ffn(raw, rows, x, self.bits, self.row_nbytes(len(x)),
                                    ACTIVATION_KINDS[activation], known, hidden_act, out)


@register
class Pal4(_Palette):
    name, bits = "pal4", 4


@register
class Pal3(_Palette):
    name, bits = "pal3", 3


@register
class Pal2(_Palette):
    name, bits = "pal2", 2


class _BlockPalette(_FittedToBlocks):
    """One fixed table of 2^bits values (`grid`, shared by every row and tensor), a float16
    scale per block of BLOCK weights and a bits-wide index per weight: a weight is
    scale[block] * grid[index]. Rows are [scales][codes]: a weight's code is its index
    stored as `_pack` writes it (the per-row palettes' packing, but see BPal3), naming the
    value levels[code]. Fitted by quant/block_palette_fit.py; fused kernels in
    quant/block_palette_kernels.py."""

    fused = True
    fits_inputs = True
    # (d3, d2, d1, d0, high): the value of code c is cubic(c) = ((d3 c + d2) c + d1) c + d0,
    # or at 3 bits cubic(c & 3) + high * (c >> 2)
    cubic: ClassVar[np.ndarray]
    levels: ClassVar[np.ndarray]  # the value of each code, as the kernels compute it
    grid: ClassVar[np.ndarray]  # the values ascending (what the fit chooses from), largest
    # magnitude 1
    scale_blocks = block_palette_fit.HALF_32  # the kernels' BLOCK and float16

    def _pack(self, indices: np.ndarray) -> np.ndarray:
        """(n, cols) indices into the grid -> the rows' code bytes."""
        return pack_indices(indices, self.bits)

    def _codes(self, payload: np.ndarray, cols: int) -> np.ndarray:
        """The inverse of _pack, as codes: (n, cols) int64 indices into `levels`."""
        return unpack_indices(payload, cols, self.bits)

    def supports(self, cols: int) -> bool:
        return cols % block_palette_fit.BLOCK == 0

    def row_nbytes(self, cols: int) -> int:
        return 2 * (cols // block_palette_fit.BLOCK) + cols * self.bits // 8

    def _check(self, cols: int) -> None:
        if not self.supports(cols):
            raise ValueError(f"{self.name} needs rows in whole blocks of "
                             f"{block_palette_fit.BLOCK}, got {cols}")

    def _row_bytes(self, scales: np.ndarray, indices: np.ndarray) -> np.ndarray:
        return np.concatenate([scales.astype(np.float16).view(np.uint8),
                               self._pack(indices)], axis=1)

    def decode(self, raw: np.ndarray, cols: int) -> np.ndarray:
        out = np.empty((len(raw), cols), np.float32)
        block_palette_kernels.decode(np.ascontiguousarray(raw), self.bits, self.cubic, out)
        return out

    def decode_reference(self, raw: np.ndarray, cols: int) -> np.ndarray:
        raw = np.ascontiguousarray(raw)
        blocks = cols // block_palette_fit.BLOCK
        scales = raw[:, :2 * blocks].view(np.float16).astype(np.float32)
        codes = self._codes(raw[:, 2 * blocks:], cols)
        return np.repeat(scales, block_palette_fit.BLOCK, axis=1) * self.levels[codes]

    def warm_up(self) -> None:
        block_palette_kernels.warm_up(self.bits, self.cubic)

    def matvec(self, raw, x, out) -> None:
        block_palette_kernels.matvec(raw, x, self.bits, self.cubic, out)

    def gate_activations(self, raw, x, activation, out) -> None:
        block_palette_kernels.gate_activations(raw, x, self.bits, self.cubic,
                                               ACTIVATION_KINDS[activation], out)

    def bundle_ffn(self, raw, rows, x, activation, gate_act, hidden_act, out) -> None:
        known = _NONE if gate_act is None else np.ascontiguousarray(gate_act, np.float32)
        block_palette_kernels.bundled_ffn(raw, rows, x, self.bits, self.cubic,
                                          self.row_nbytes(len(x)),
                                          ACTIVATION_KINDS[activation], known, hidden_act, out)


def _cubic(values: list[float]) -> np.ndarray:
    """(d3, d2, d1, d0), float32: the cubic in the index (0 .. len(values) - 1) nearest the
    sorted `values` by least squares, scaled so its largest value at an index has magnitude
    1. The grids below are this cubic's values, so kernels that add decoded rows compute a
    weight (three multiply-adds, which vectorize) instead of gathering it from the table."""
    index = np.arange(len(values))
    coefficients = np.polyfit(index, np.sort(np.asarray(values, np.float64)), 3)
    return (coefficients / np.abs(np.polyval(coefficients, index)).max()).astype(np.float32)


def _values(cubic: np.ndarray, n: int) -> np.ndarray:
    """The cubic at 0 .. n - 1 in float32, as the kernels evaluate it (Horner's rule)."""
    d3, d2, d1, d0 = cubic[:4]
    u = np.arange(n, dtype=np.float32)
    return ((d3 * u + d2) * u + d1) * u + d0


def _no_high(cubic: np.ndarray) -> np.ndarray:
    """`cubic` with a high step of 0 (codecs whose codes are plain indices)."""
    return np.append(cubic, np.float32(0.0)).astype(np.float32)


@register
class BPal4(_BlockPalette):
    # IQ4_NL's table (ggml's kvalues_iq4nl: non-uniform, denser near zero, with one value
    # near zero and the wider side negative) as a cubic in the index, within 1/127 of it;
    # the block scale's search picks the sign
    name, bits, revision = "bpal4", 4, 2
    cubic = _no_high(_cubic([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69,
                             89, 113]))
    grid = levels = _values(cubic, 16)


def _planar_levels() -> tuple[np.ndarray, np.ndarray]:
    """(cubic, levels) of bpal3: code c = low | high << 2 is worth low_level[low] + step *
    high, four low levels (a cubic through them exactly) and one step. The values are fitted
    to weights, as IQ4_NL's table was (tools/fit_bpal3_levels.py): Lloyd-style rounds (each
    weight's nearest level at its block's searched scale, then the 5 values by least
    squares) on 8,576 rows of Gemma 3 270M (4,096 of the embedding, layer 3's attention and
    FFN matrices). Like IQ4_NL's the table is asymmetric (the scale search puts a block's
    largest weight on the wide side). Relative squared error on rows of layers 9 and 15:
    0.0247, against 0.0281 for the Gaussian Lloyd-Max levels (codec revision 2); on
    held-out text, KL to the source 0.477 against 0.741 (docs/benchmarks.md)."""
    low, step = np.array([-0.7878, -0.2004, -0.0062, 0.6413]), 0.3587
    cubic = np.polyfit(np.arange(4), low, 3).astype(np.float32)
    low_levels = _values(cubic, 4)
    return np.append(cubic, np.float32(step)).astype(np.float32), \
        np.concatenate([low_levels, low_levels + np.float32(step)]).astype(np.float32)


@register
class BPal3(_BlockPalette):
    # codes in two planes (the low 2 bits as bpal2 packs its indices, then the high bit of
    # every weight, 8 to a byte, lowest first) and a table that is their sum: the kernels
    # compute a weight as the cubic of its low bits plus the step times its high bit, with
    # no code straddling two bytes (quant/block_palette_kernels.py)
    name, bits, revision = "bpal3", 3, 3
    cubic, levels = _planar_levels()
    grid = np.sort(levels)
    _code_of = np.argsort(levels).astype(np.uint8)  # the code of grid[i]

    def _pack(self, indices: np.ndarray) -> np.ndarray:
        codes = self._code_of[indices]
        return np.concatenate([pack_indices(codes & 3, 2),
                               np.packbits(codes >> 2, axis=1, bitorder="little")], axis=1)

    def _codes(self, payload: np.ndarray, cols: int) -> np.ndarray:
        low = unpack_indices(payload[:, :cols // 4], cols, 2)
        high = np.unpackbits(payload[:, cols // 4:], axis=1, count=cols, bitorder="little")
        return low | (high.astype(np.int64) << 2)


@register
class BPal2(_BlockPalette):
    # the 4-level Lloyd-Max quantizer of a unit Gaussian (Max 1960): four points, a cubic
    # through them exactly
    name, bits, revision = "bpal2", 2, 2
    cubic = _no_high(_cubic([-1.510, -0.4528, 0.4528, 1.510]))
    grid = levels = _values(cubic, 4)


def codec(name: str) -> Codec:
    if name not in CODECS:
        raise ValueError(f"unknown codec '{name}' (known: {', '.join(CODECS)})")
    return CODECS[name]


TENSOR_GROUPS = ("embed", "attn", "ffn")  # what a codec spec can set on its own


def parse_codec_spec(spec: str) -> dict[str, Codec]:
    """A store's codecs from "CODEC[,GROUP=CODEC...]" (e.g. "pal4,embed=int4"): the codec of
    each tensor group (the embedding and output layer, attention, FFN); one raises
    ValueError naming what is wrong. The embedding may be split by token,
    "embed=HOT@N/COLD" (store/vocab_tiers.py): its codec here is HOT's (see embed_tiers)."""
    base, *overrides = [part.strip() for part in spec.split(",")]
    chosen = dict.fromkeys(TENSOR_GROUPS, codec(base))
    given = set()
    for override in overrides:
        group, _, name = override.partition("=")
        if group not in TENSOR_GROUPS or not name:
            raise ValueError(f"codec spec {spec!r}: {override!r} is not GROUP=CODEC with GROUP "
                             f"one of {', '.join(TENSOR_GROUPS)}")
        if group in given:
            raise ValueError(f"codec spec {spec!r}: {group} is given twice")
        given.add(group)
        name, tiered, tiers = name.partition("@")
        if tiered and group != "embed":
            raise ValueError(f"codec spec {spec!r}: only the embedding is split by token "
                             "(embed=HOT@N/COLD)")
        chosen[group] = codec(name)
        if tiered:
            _parse_tiers(spec, tiers)
    return chosen


def _parse_tiers(spec: str, tiers: str) -> tuple[int | float, Codec]:
    """The hot tokens and the cold codec of "N/COLD" (a count) or "P%/COLD" (a share of the
    vocabulary, returned as a float fraction), after an embedding codec's "@"."""
    count, _, cold = tiers.partition("/")
    if cold and re.fullmatch(r"[0-9]+", count) and int(count) >= 1:
        return int(count), codec(cold)
    if cold and re.fullmatch(r"[0-9]+(\.[0-9]+)?%", count) and 0 < float(count[:-1]) < 100:
        return float(count[:-1]) / 100, codec(cold)
    raise ValueError(f"codec spec {spec!r}: the embedding's tiers are HOT@N/COLD or "
                     "HOT@P%/COLD, with N the tokens in HOT (at least 1) or P the share of "
                     "the vocabulary (between 0 and 100)")


def with_tier_count(spec: str, vocab: int) -> str:
    """`spec` (valid) with a hot tier given as a share ("@12.5%/") given as the count of
    tokens it comes to in a `vocab`-token vocabulary ("@32768/"): one spelling per store."""
    tiers = embed_tiers(spec, vocab)
    if tiers is None:
        return spec
    return re.sub(r"@[0-9.]+%/", f"@{tiers[0]}/", spec)


def embed_tiers(spec: str, vocab: int) -> tuple[int, Codec] | None:
    """How many of a `vocab`-token embedding's tokens a spec's "embed=HOT@N/COLD" (or
    "@P%/COLD") keeps in HOT, and the cold codec; None without tiers (the spec is valid:
    parse_codec_spec checked it)."""
    for override in spec.split(",")[1:]:
        group, _, name = override.strip().partition("=")
        if group == "embed" and "@" in name:
            hot, cold = _parse_tiers(spec, name.partition("@")[2])
            return (hot if isinstance(hot, int) else max(1, round(hot * vocab))), cold
    return None
