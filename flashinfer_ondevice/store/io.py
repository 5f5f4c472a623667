"""Direct I/O: read byte ranges of a store file with O_DIRECT into page-aligned buffers.

No mmap and no page cache for weights: reads bypass the cache (O_DIRECT), are split into
chunks issued from a thread pool so many are in flight (os.preadv releases the GIL), and
adjacent ranges are coalesced into one read. Counters record bytes read, reads issued and
the time callers spent waiting.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ..errors import FlashInferError
from ..memory import aligned_buffer
from ..stats import IOStats
from .format import ALIGN

READ_CHUNK = 256 << 10  # bytes per read; 256 KiB reaches full bandwidth here (research-notes)


class PendingRead:
    """Reads in flight into one buffer; `wait()` blocks until all landed."""

    def __init__(self, futures: list[Future], stats: IOStats):
        self._futures = futures
        self._stats = stats

    def wait(self) -> None:
        start = time.perf_counter()
        for future in self._futures:
            future.result()
        self._stats.wait_seconds += time.perf_counter() - start


class DirectReader:
    """Aligned reads of one file on a thread pool (O_DIRECT where the filesystem has it).

    `submit` is called from one thread (the forward pass); the pool only does the reads."""

    def __init__(self, path, threads: int = 32, stats: IOStats | None = None):
        self.path = str(path)
        flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0)
        try:
            self.fd = os.open(self.path, flags)
            self.direct = bool(flags & getattr(os, "O_DIRECT", 0))
        except OSError:  # a filesystem without O_DIRECT (tmpfs): plain reads
            try:
                self.fd = os.open(self.path, os.O_RDONLY)
            except OSError as exc:
                raise FlashInferError(f"cannot read {self.path}: {exc.strerror}") from None
            self.direct = False
        if not self.direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
        self.stats = IOStats() if stats is None else stats  # shared with other readers
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="fi-io")

    def _read_into(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise OSError(f"short read from {self.path} at {offset + done}")
            done += n

    def submit(self, ranges: list[tuple[int, int, int]], buffer: np.ndarray) -> PendingRead:
        """Start reading `ranges` of (file_offset, nbytes, buffer_offset), all ALIGN-aligned.

        Ranges contiguous in both the file and the buffer are coalesced, then split into
        READ_CHUNK requests that run concurrently.
        """
        merged: list[list[int]] = []
        for file_off, nbytes, buf_off in sorted(ranges):
            if merged and merged[-1][0] + merged[-1][1] == file_off and \
                    merged[-1][2] + merged[-1][1] == buf_off:
                merged[-1][1] += nbytes
            else:
                merged.append([file_off, nbytes, buf_off])
        view = memoryview(buffer)
        pieces = []  # (buffer view, file offset) of READ_CHUNK at most
        for file_off, nbytes, buf_off in merged:
            for start in range(0, nbytes, READ_CHUNK):
                size = min(READ_CHUNK, nbytes - start)
                pieces.append((view[buf_off + start: buf_off + start + size], file_off + start))
                # counted when issued, so a token's figures do not depend on when the
                # prefetch for the next token happens to land (a failed read raises)
                self.stats.bytes_read += size
        self.stats.reads += len(pieces)
        # one pool task per full-size read; small scattered reads (single pages) are shared
        # out among as many tasks as there are threads, so each task costs more than its
        # hand-off
        total = sum(len(v) for v, _ in pieces)
        tasks = min(len(pieces), max(self.threads, total // READ_CHUNK))
        futures = [self._pool.submit(self._read_all, pieces[i::tasks]) for i in range(tasks)]
        return PendingRead(futures, self.stats)

    def _read_all(self, pieces: list[tuple[memoryview, int]]) -> None:
        for view, offset in pieces:
            self._read_into(view, offset)

    def read_rows(self, offset: int, row_nbytes: int, ids: np.ndarray, scratch: np.ndarray,
                  out: np.ndarray) -> None:
        """Read rows `ids` (sorted, unique) of a tensor starting at `offset` into
        out[:len(ids)]: each row's byte range widened to pages, the pages coalesced into
        runs, in as few batches as `scratch` (aligned) holds the distinct pages of."""
        if not len(ids):
            return
        starts = offset + np.asarray(ids, np.int64) * row_nbytes
        first_page, last_page = starts // ALIGN, (starts + row_nbytes - 1) // ALIGN
        spans = last_page - first_page + 1
        pages = np.unique(np.repeat(first_page, spans)
                          + np.arange(spans.sum()) - np.repeat(np.cumsum(spans) - spans, spans))
        first_at, last_at = np.searchsorted(pages, first_page), np.searchsorted(pages, last_page)
        capacity = len(scratch) // ALIGN  # pages per batch
        if capacity < spans.max():
            raise ValueError(f"scratch of {len(scratch)} bytes cannot hold a {row_nbytes}-byte row")
        rows_view = np.lib.stride_tricks.sliding_window_view(scratch, row_nbytes)
        begin = 0
        while begin < len(ids):
            base = first_at[begin]  # rows whose pages all fit after this one
            end = int(np.searchsorted(last_at, base + capacity, side="left"))
            batch = pages[base:last_at[end - 1] + 1]
            # contiguous page runs become single reads; page k lands at scratch[(k-base)*ALIGN]
            breaks = np.flatnonzero(np.diff(batch) != 1) + 1
            runs = np.split(np.arange(len(batch)), breaks)
            self.submit([(int(batch[r[0]]) * ALIGN, len(r) * ALIGN, int(r[0]) * ALIGN)
                         for r in runs], scratch).wait()
            where = (first_at[begin:end] - base) * ALIGN + starts[begin:end] % ALIGN
            out[begin:end] = rows_view[where]
            begin = end

    def read(self, file_offset: int, nbytes: int) -> np.ndarray:
        """Synchronously read any byte range (widened to alignment); returns exactly it."""
        start = file_offset - file_offset % ALIGN
        end = -(-(file_offset + nbytes) // ALIGN) * ALIGN
        buffer = aligned_buffer(end - start)
        self.submit([(start, end - start, 0)], buffer).wait()
        return buffer[file_offset - start: file_offset - start + nbytes]

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        os.close(self.fd)
