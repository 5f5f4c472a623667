"""Streamed units: the byte ranges one buffer of the I/O ring receives, and how large a ring
buffer must be to hold any of them.

Every forward pass walks the same cycle of units: a layer's non-resident tensors, then the
output layer's non-resident rows in chunks (of OUTPUT_CHUNK bytes, or OUTPUT_ONLY_CHUNK when
no layer streams: the plan's `head_chunk`). Each tensor (or row range)
is read page-aligned, so a unit's size is the sum of its parts' aligned spans. The planner
sizes the ring with `unit_capacity` (for whole layers first, then for what its placement
streams); the streamed weights lay out the real units and check that each fits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..store.format import ALIGN, align_up
from ..store.reader import TensorEntry

OUTPUT_CHUNK = 4 << 20  # bytes of output-layer rows streamed as one unit
# OUTPUT_ONLY_CHUNK: the same when the output layer is all that streams: the ring's buffers
# then need hold no layer,
# and each byte they do not take is a byte more of resident rows. Gemma 3 270M's 114 MB
# tiered store at the 50% limit (decode tok/s, medians of 6 / 4 alternating cold runs):
# 4 MB 25.0 (a 12.6 MB ring, 50.8 MB read a token), 2 MB 27.0, 1 MB 29.0-29.4 (3.2 MB,
# 41.4 MB read), 512 KB 26.2 (more, smaller reads)
OUTPUT_ONLY_CHUNK = 1 << 20


@dataclass
class Part:
    """One tensor (or a row range of one) inside a unit's buffer."""

    entry: TensorEntry
    row_start: int
    row_end: int
    buffer_offset: int  # where the aligned read of these rows starts in the buffer
    skip: int  # bytes between the aligned read start and the first row

    @property
    def file_start(self) -> int:
        return self.entry.offset + self.row_start * self.entry.row_nbytes - self.skip

    @property
    def read_nbytes(self) -> int:
        end = self.entry.offset + self.row_end * self.entry.row_nbytes
        return align_up(end - self.file_start)


@dataclass
class Unit:
    parts: list[Part] = field(default_factory=list)
    nbytes: int = 0  # aligned bytes read

    def add(self, entry: TensorEntry, row_start: int, row_end: int) -> None:
        start = entry.offset + row_start * entry.row_nbytes
        part = Part(entry, row_start, row_end, self.nbytes, start % ALIGN)
        self.parts.append(part)
        self.nbytes += part.read_nbytes


def head_chunk_rows(head: TensorEntry, chunk: int) -> int:
    """Rows of the output layer streamed as one unit of about `chunk` bytes."""
    return max(1, chunk // head.row_nbytes)


def head_chunk(layer_units: list[list]) -> int:
    """Bytes of output-layer rows a unit holds, given the layer units that stream (lists of
    their tensors; empty where a layer is resident)."""
    return OUTPUT_CHUNK if any(layer_units) else OUTPUT_ONLY_CHUNK


def unit_capacity(layer_units: list[list[TensorEntry]], head: list[TensorEntry],
                  chunk: int) -> int:
    """Bytes a ring buffer needs to hold any unit: a layer's tensors read whole (each starts
    page-aligned in the store), or a chunk of about `chunk` bytes of output-layer rows
    starting anywhere in a page (`head`: the output layer's tensors, its tiers
    (runtime/head_rows.py); none: it never streams)."""
    largest = max([sum(align_up(e.nbytes) for e in entries) for entries in layer_units],
                  default=0)
    for entry in head:
        rows = min(entry.rows, head_chunk_rows(entry, chunk))
        largest = max(largest, align_up(ALIGN - 1 + rows * entry.row_nbytes))
    return largest
