"""Process memory figures for run statistics (peak and current resident set size), and handing
freed memory back to the OS."""

from __future__ import annotations

import contextlib
import ctypes
import resource
import sys

import psutil


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
