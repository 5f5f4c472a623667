"""The KV spill file: old blocks of the global layers' keys and values, on flash.

When a context's KV cache does not fit the memory budget, each global (full-attention) layer
keeps its last `resident` positions in DRAM and writes older ones here, a BLOCK of positions
at a time, once; attention reads them back with direct I/O (no page cache, which would count
against the budget) a chunk at a time, the next chunk in flight while the current one is
used (FlexGen/Fuyou-style offload).

Layout: one region per (global layer, array, kv head), array being keys, values and, for q8,
their scales; a region holds the layer's blocks 0, 1, ... back to back, so blocks b..b+n of
one head are one contiguous read that lands as entries b*BLOCK.. of a (kv_heads, entries,
...) staging array, the form attention reads. BLOCK = 1024 makes every block a whole number
of pages (a block of q8 scales is 4 KiB).

The file is created next to the store and unlinked at once: it lives as long as the cache,
and a killed process leaves nothing behind. A crc32 of every block written is kept in memory
and checked when the block is read back, so a corrupt or truncated file is an error, never
silently wrong attention.
"""

from __future__ import annotations

import os
import tempfile
import time
import weakref
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .errors import FlashInferError
from .memory import aligned_buffer, aligned_nbytes
from .stats import IOStats

BLOCK = 1024  # positions per spilled block
READ_BYTES = 2 << 20  # bytes of one staged chunk (two are staged: one read, one in use)
READ_THREADS = 4  # reads of a chunk in flight at once


class SpillError(FlashInferError):
    """The KV spill file cannot be created, written or read back intact."""


class SpillFile:
    """Spilled blocks of global layers (numbered 0, 1, ... in the file), `max_blocks` at most
    per layer, of arrays of `dtypes` whose one position of one kv head has shape
    `row_shapes`: (head_dim,) for keys and values, () for scales."""

    def __init__(self, directory: Path, kv_heads: int, max_blocks: int,
                 dtypes: list[np.dtype], row_shapes: list[tuple[int, ...]]):
        self.kv_heads, self.max_blocks = kv_heads, max_blocks
        self.dtypes, self.row_shapes = dtypes, row_shapes
        entry = entry_nbytes(dtypes, row_shapes)
        self.block_nbytes = [BLOCK * n for n in entry]  # one head, one block
        regions = [kv_heads * max_blocks * n for n in self.block_nbytes]  # one layer's arrays
        self._array_offsets = [sum(regions[:a]) for a in range(len(regions))]
        self._layer_nbytes = sum(regions)
        self.chunk_blocks = chunk_blocks(kv_heads, entry, max_blocks)
        self.stats = IOStats()  # bytes_read: spilled KV read back
        self.bytes_written = 0
        self._crcs: dict[tuple[int, int, int, int], int] = {}  # (layer, array, head, block)
        self._fd = _open_unlinked(directory)
        self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="fi-kv-spill")
        self._close = weakref.finalize(self, _close, self._fd, self._pool)
        self._staging = [[aligned_buffer(kv_heads * self.chunk_blocks * n)
                          for n in self.block_nbytes] for _ in range(2)]

    @staticmethod
    def staging_nbytes(kv_heads: int, max_blocks: int, dtypes: list[np.dtype],
                       row_shapes: list[tuple[int, ...]]) -> int:
        """DRAM of the two staged chunks (what the planner counts on top of the rings)."""
        entry = entry_nbytes(dtypes, row_shapes)
        blocks = chunk_blocks(kv_heads, entry, max_blocks)
        return 2 * sum(aligned_nbytes(kv_heads * blocks * BLOCK * n) for n in entry)

    @property
    def staging_bytes(self) -> int:
        return sum(b.nbytes for slot in self._staging for b in slot)

    def _offset(self, layer: int, array: int, head: int, block: int) -> int:
        return layer * self._layer_nbytes + self._array_offsets[array] \
            + (head * self.max_blocks + block) * self.block_nbytes[array]

    def write(self, layer: int, block: int, arrays: list[np.ndarray]) -> None:
        """Write block `block` of `layer`: arrays[a] (kv_heads, BLOCK, ...) C-contiguous per
        head and page-aligned (slices of the cache's aligned rings)."""
        if not 0 <= block < self.max_blocks:
            raise SpillError(f"KV block {block} is beyond the spill file's {self.max_blocks}")
        for a, data in enumerate(arrays):
            for head in range(self.kv_heads):
                piece = memoryview(np.ascontiguousarray(data[head])).cast("B")
                offset = self._offset(layer, a, head, block)
                try:
                    done = 0
                    while done < len(piece):
                        done += os.pwritev(self._fd, [piece[done:]], offset + done)
                except OSError as error:
                    raise SpillError(f"cannot write the KV spill file: {error}") from error
                self._crcs[layer, a, head, block] = zlib.crc32(piece)
                self.bytes_written += len(piece)

    def chunks(self, layer: int, blocks: int) -> Iterator[tuple[list[np.ndarray], int, int]]:
        """Blocks 0..blocks of `layer` as (arrays (kv_heads, entries, ...), first block,
        block count), a chunk at a time. The first chunk's reads start now; each next
        chunk's start when the previous one is handed out, so the reads overlap the caller's
        work on it. An array handed out is valid until the next one is asked for."""
        starts = list(range(0, blocks, self.chunk_blocks))
        if not starts:
            return iter(())
        first = self._submit(layer, starts[0], min(self.chunk_blocks, blocks), 0)
        return self._chunks(layer, blocks, starts, first)

    def _chunks(self, layer: int, blocks: int, starts: list[int],
                pending: list[Future]) -> Iterator[tuple[list[np.ndarray], int, int]]:
        try:
            for i, start in enumerate(starts):
                count = min(self.chunk_blocks, blocks - start)
                began = time.perf_counter()
                for future in pending:
                    future.result()
                self.stats.wait_seconds += time.perf_counter() - began
                pending = []
                if i + 1 < len(starts):
                    nxt = starts[i + 1]
                    pending = self._submit(layer, nxt, min(self.chunk_blocks, blocks - nxt),
                                           (i + 1) % 2)
                yield self._staged(i % 2, count), start, count
        finally:  # abandoned early: no read may land in a buffer handed out again later
            for future in pending:
                future.exception()

    def _staged(self, slot: int, count: int) -> list[np.ndarray]:
        out = []
        for a, buffer in enumerate(self._staging[slot]):
            per_head = self.chunk_blocks * self.block_nbytes[a]
            entries = buffer[:self.kv_heads * per_head].reshape(self.kv_heads, per_head)
            rows = entries[:, :count * self.block_nbytes[a]].view(self.dtypes[a])
            out.append(rows.reshape(self.kv_heads, count * BLOCK, *self.row_shapes[a]))
        return out

    def _submit(self, layer: int, first: int, count: int, slot: int) -> list[Future]:
        """Read blocks first..first+count of every array and head into staging `slot`."""
        futures = []
        for a, buffer in enumerate(self._staging[slot]):
            per_head = self.chunk_blocks * self.block_nbytes[a]
            for head in range(self.kv_heads):
                view = memoryview(buffer)[head * per_head:
                                          head * per_head + count * self.block_nbytes[a]]
                futures.append(self._pool.submit(self._read, view, layer, a, head, first))
                self.stats.bytes_read += len(view)
                self.stats.reads += 1
        return futures

    def _read(self, view: memoryview, layer: int, array: int, head: int, first: int) -> None:
        """Read one head's blocks of one array and check each block's crc32 (zlib releases
        the GIL for both)."""
        offset = self._offset(layer, array, head, first)
        done = 0
        while done < len(view):
            try:
                n = os.preadv(self._fd, [view[done:]], offset + done)
            except OSError as error:
                raise SpillError(f"cannot read the KV spill file: {error}") from error
            if n <= 0:
                raise SpillError("the KV spill file is truncated: a block written earlier "
                                 "is gone")
            done += n
        size = self.block_nbytes[array]
        for i in range(len(view) // size):
            expected = self._crcs.get((layer, array, head, first + i))
            if expected is None or zlib.crc32(view[i * size:(i + 1) * size]) != expected:
                raise SpillError(f"the KV spill file is corrupt (block {first + i} of global "
                                 f"layer {layer} does not read back as written)")

    def close(self) -> None:
        self._close()


def entry_nbytes(dtypes: list[np.dtype], row_shapes: list[tuple[int, ...]]) -> list[int]:
    """Bytes of one position of one head in each array."""
    return [np.dtype(d).itemsize * int(np.prod(s, dtype=np.int64))
            for d, s in zip(dtypes, row_shapes, strict=True)]


def chunk_blocks(kv_heads: int, entry_nbytes: list[int], max_blocks: int) -> int:
    """Blocks per staged chunk: as many as READ_BYTES hold (at least one), no more than a
    layer can spill."""
    return max(1, min(max_blocks, READ_BYTES // (kv_heads * BLOCK * sum(entry_nbytes))))


def _open_unlinked(directory: Path) -> int:
    """A new file in `directory`, opened for direct I/O where the filesystem allows, and
    already unlinked."""
    try:
        fd, path = tempfile.mkstemp(prefix=".kv-spill-", dir=directory)
    except OSError as error:
        raise SpillError(f"cannot create the KV spill file in {directory}: {error}") from error
    os.close(fd)
    try:
        try:
            return os.open(path, os.O_RDWR | getattr(os, "O_DIRECT", 0))
        except OSError:  # no O_DIRECT on this filesystem (tmpfs)
            return os.open(path, os.O_RDWR)
    finally:
        os.unlink(path)


def _close(fd: int, pool: ThreadPoolExecutor) -> None:
    pool.shutdown(wait=True)
    os.close(fd)
