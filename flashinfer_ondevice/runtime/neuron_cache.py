"""Windowed neuron cache (LLM in a flash): one layer's recently used FFN bundles in DRAM.

Preallocated rows, the neuron id held by each row, and the row of each neuron. After each
token the cache keeps the union of the last `window` tokens' neurons (as far as capacity
allows); a token reads only the neurons it needs that are not cached, their byte ranges
widened to pages and coalesced. Deleting a neuron moves the last row into its place, so the
rows stay packed and compute runs over row indices.
"""

from __future__ import annotations

import time

import numpy as np

from ..backends import make_backend
from ..backends.base import Backend
from ..store.io import DirectReader
from ..store.reader import TensorEntry
from .stored import BundledFFN

_NEVER = np.iinfo(np.int64).min // 2
SCRATCH = 4 << 20  # aligned buffer the neuron caches read pages into (shared by all layers)
SPILL = 4 << 20  # rows a token's neurons beyond a cache's capacity are read into (shared)


def spill_rows(entry: TensorEntry) -> int:
    """Rows of the shared spill buffer for FFN bundles like `entry`'s."""
    return max(1, min(entry.rows, SPILL // entry.row_nbytes))


def shared_nbytes(entry: TensorEntry) -> int:
    """Bytes of the buffers every layer's cache shares: the read scratch and the spill rows."""
    return SCRATCH + spill_rows(entry) * entry.row_nbytes


class NeuronCache:
    """`scratch`: aligned buffer pages are read into; `spill`: (spill_rows, row_nbytes) rows
    that a token's neurons beyond the capacity are read into and computed from, uncached
    (both shared by every layer's cache: layers run one after another)."""

    def __init__(self, entry: TensorEntry, reader: DirectReader, capacity: int, window: int,
                 scratch: np.ndarray, spill: np.ndarray, activation: str,
                 backend: Backend | None = None):
        self.entry, self.reader, self.window, self.scratch = entry, reader, window, scratch
        self.capacity = capacity
        self.rows = np.zeros((capacity, entry.row_nbytes), np.uint8)
        backend = backend or make_backend()
        self.ffn = BundledFFN(self.rows, entry.codec, entry.cols, activation, backend)
        self.spill = BundledFFN(spill, entry.codec, entry.cols, activation, backend)
        self.ids = np.zeros(capacity, np.int64)  # neuron held by each row
        self.row_of = np.full(entry.rows, -1, np.int64)  # row of each neuron, -1 if absent
        self.last_used = np.full(entry.rows, _NEVER, np.int64)  # token step of last use
        self.size = 0
        self.step = 0

    @staticmethod
    def planned_nbytes(entry: TensorEntry, capacity: int) -> int:
        """What a cache of `capacity` bundles of `entry` allocates (rows and bookkeeping)."""
        return capacity * (entry.row_nbytes + 8) + 2 * 8 * entry.rows

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.rows, self.ids, self.row_of, self.last_used))

    def apply(self, x: np.ndarray, needed: np.ndarray,
              gate_act: np.ndarray | None = None) -> np.ndarray:
        """FFN output for one token over the neurons `needed` (sorted ids); `gate_act`:
        their act(gate . x), if the selector computed them. Counts needed = hits + read.

        Cached neurons are used where they are; missing ones are read into the cache as far
        as it holds them (evicting the least recently used neurons this token does not
        need), the rest through the spill rows, all in sorted batches of coalesced pages."""
        stats = self.reader.stats
        start = time.perf_counter()
        self.step += 1
        self.last_used[needed] = self.step
        stale = self.last_used[self.ids[:self.size]] <= self.step - self.window
        self._delete(np.flatnonzero(stale))
        cached = self.row_of[needed] >= 0
        hits = int(cached.sum())
        stats.neurons_needed += len(needed)
        stats.neuron_hits += hits
        missing = np.flatnonzero(~cached)  # positions in `needed`
        admitted, spilled = missing[:self.capacity - hits], missing[self.capacity - hits:]
        overflow = self.size + len(admitted) - self.capacity
        if overflow > 0:  # evict the least recently used rows this token does not need
            keep = np.zeros(self.size, bool)
            keep[self.row_of[needed[cached]]] = True
            candidates = np.flatnonzero(~keep)
            order = np.argsort(self.last_used[self.ids[candidates]], kind="stable")
            self._delete(candidates[order[:overflow]])
        stats.cache_seconds += time.perf_counter() - start
        self._read(needed[admitted])
        held = np.sort(np.concatenate([np.flatnonzero(cached), admitted]))
        out = self.ffn.apply_rows(x, self.row_of[needed[held]],
                                  None if gate_act is None else gate_act[held])
        per_spill = len(self.spill.raw)
        for first in range(0, len(spilled), per_spill):
            part = spilled[first:first + per_spill]
            self.reader.read_rows(self.entry.offset, self.entry.row_nbytes, needed[part],
                                  self.scratch, self.spill.raw)
            stats.neurons_read += len(part)
            out += self.spill.apply_rows(x, np.arange(len(part)),
                                         None if gate_act is None else gate_act[part])
        return out

    def _delete(self, rows: np.ndarray) -> None:
        """Remove the neurons in `rows`, filling the holes with the last rows."""
        if not len(rows):
            return
        dropped = np.zeros(self.size, bool)
        dropped[rows] = True
        self.row_of[self.ids[rows]] = -1
        new_size = self.size - len(rows)
        holes = np.flatnonzero(dropped[:new_size])
        movers = new_size + np.flatnonzero(~dropped[new_size:self.size])
        self.rows[holes] = self.rows[movers]
        self.ids[holes] = self.ids[movers]
        self.row_of[self.ids[holes]] = holes
        self.size = new_size

    def _read(self, neurons: np.ndarray) -> None:
        """Read `neurons` (sorted, absent, fitting) into rows size.. size+len."""
        rows = np.arange(self.size, self.size + len(neurons))
        self.reader.read_rows(self.entry.offset, self.entry.row_nbytes, neurons, self.scratch,
                              self.rows[self.size:self.size + len(neurons)])
        self.ids[rows] = neurons
        self.row_of[neurons] = rows
        self.size += len(neurons)
        self.reader.stats.neurons_read += len(neurons)
