"""Process memory figures for run statistics (peak and current resident set size), handing
freed memory back to the OS, and the page-aligned buffers direct I/O reads into and writes
from."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import resource
import sys

import numpy as np
import psutil

PAGE = 4096  # the alignment O_DIRECT asks of offsets, sizes and buffers


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def release_freed_memory() -> None:
    """Hand memory freed by C libraries back to the OS (glibc keeps it otherwise)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def aligned_nbytes(nbytes: int) -> int:
    """What an aligned_buffer of `nbytes` takes: whole pages, at least one."""
    return max(PAGE, -(-nbytes // PAGE) * PAGE)


def aligned_buffer(nbytes: int) -> np.ndarray:
    """A page-aligned, zero-filled uint8 buffer (anonymous mmap), as O_DIRECT requires; its
    pages are committed as they are written."""
    return np.frombuffer(mmap.mmap(-1, aligned_nbytes(nbytes)), dtype=np.uint8)


def release_pages(buffer: np.ndarray) -> None:
    """Return an aligned_buffer's pages to the OS; it reads as zeros until written again."""
    buffer.base.obj.madvise(mmap.MADV_DONTNEED)
