"""`run-model probe`: what this machine's storage delivers, and the prediction it feeds.

Storage: direct (O_DIRECT, no page cache) reads of a store's weights file at random aligned
offsets, for each chunk size and queue depth (threads each keeping one read in flight), and
random 4 KiB reads (IOPS). Results are cached per device (the file's st_dev) in the models
folder, so a profile on the same disk does not probe again.

Prediction (`run-model profile --plan-only`): per token, the plan's streamed bytes at the
bandwidth of the reader's chunk size and queue depth, plus the shortlist's candidate rows
that are not resident at the 4 KiB rate, plus the compute time of the same configuration
with every weight resident under a budget (measured once per configuration: a few tokens in
a child process). The ring reads the next layers while one computes, so the longer of I/O
and compute sets the pace and about half of the shorter one shows (OVERLAP_MISS: fitted on
Gemma 3 270M at 25/50/100% budgets on a 2-core Xeon, exact and shortlist heads; the full
profile prints prediction beside measurement so it can be checked on any machine).
"""

from __future__ import annotations

import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..memory import PAGE, aligned_buffer
from ..store.io import READ_CHUNK

CHUNKS = (64 << 10, 256 << 10, 1 << 20, 4 << 20)
DEPTHS = (1, 4, 16)
READER_DEPTH = 16  # reads the store's reader keeps in flight (store/io.py)
POINT_BYTES = 64 << 20  # read per (chunk, depth) point
IOPS_READS = 4096  # random 4 KiB reads for the IOPS figure
OVERLAP_MISS = 0.5  # share of the shorter of I/O and compute time that is not hidden


def _read_random(fd: int, size: int, chunk: int, count: int, seed: int) -> None:
    buffer = memoryview(aligned_buffer(chunk))
    rng = random.Random(seed)
    slots = max(1, (size - chunk) // PAGE)
    for _ in range(count):
        offset = rng.randrange(slots) * PAGE
        done = 0
        while done < chunk:
            n = os.preadv(fd, [buffer[done:]], offset + done)
            if n <= 0:
                break
            done += n


def _rate(fd: int, size: int, chunk: int, depth: int, total: int) -> float:
    """Bytes per second of `depth` threads reading `chunk`-byte pieces at random offsets."""
    per_thread = max(1, total // chunk // depth)
    start = time.perf_counter()
    with ThreadPoolExecutor(depth) as pool:
        for future in [pool.submit(_read_random, fd, size, chunk, per_thread, seed)
                       for seed in range(depth)]:
            future.result()
    return depth * per_thread * chunk / (time.perf_counter() - start)


def probe_storage(path: Path) -> dict:
    """Direct-read bandwidth by chunk size and queue depth, and random 4 KiB IOPS, of the
    device holding `path` (a large file: a store's weights)."""
    size = path.stat().st_size
    flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0)
    try:
        fd, direct = os.open(path, flags), hasattr(os, "O_DIRECT")
    except OSError:
        fd, direct = os.open(path, os.O_RDONLY), False
    try:
        total = min(POINT_BYTES, size)
        bandwidth = {f"{chunk >> 10}K@{depth}": _rate(fd, size, chunk, depth, total)
                     for chunk in CHUNKS for depth in DEPTHS if chunk < size}
        iops = _rate(fd, size, PAGE, READER_DEPTH, IOPS_READS * PAGE) / PAGE
    finally:
        os.close(fd)
    return {"device": path.stat().st_dev, "direct": direct, "file_bytes": size,
            "bandwidth": bandwidth, "iops_4k": iops}


def cached_probe(path: Path, cache_dir: Path, fresh: bool = False) -> dict:
    """probe_storage of `path`'s device, from the cache unless `fresh` or the cached probe
    read a smaller file than `path` would give it (a small file has no large chunks, and
    reads it mostly from the drive's own cache)."""
    cache = cache_dir / f"probe-{path.stat().st_dev}.json"
    wanted = min(path.stat().st_size, max(CHUNKS) * 16)
    if cache.is_file() and not fresh:
        try:
            cached = json.loads(cache.read_text())
            if cached.get("file_bytes", 0) >= wanted:
                return cached
        except (OSError, ValueError):
            pass
    result = probe_storage(path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result, indent=1))
    return result


def reader_bandwidth(probe: dict) -> float:
    """Bytes per second the store's reader gets: its chunk size at its queue depth."""
    key = f"{READ_CHUNK >> 10}K@{READER_DEPTH}"
    return probe["bandwidth"].get(key) or max(probe["bandwidth"].values())


def predict(plan: dict, compute_s: float, probe: dict, head_rows_resident: float) -> dict:
    """Predicted seconds and bytes per token of a plan (report's plan record), given the
    configuration's compute time per token and the probe; `head_rows_resident`: the share
    of the output layer's rows resident (shortlist candidates outside it are read)."""
    streamed = plan["streamed_bytes"]
    candidates = plan["shortlist"] * (1.0 - head_rows_resident)
    io_s = streamed / reader_bandwidth(probe) + candidates / probe["iops_4k"]
    seconds = max(compute_s, io_s) + OVERLAP_MISS * min(compute_s, io_s)
    return {"decode_tps": 1.0 / seconds, "bytes_per_token": streamed + candidates * PAGE,
            "io_ms": io_s * 1000, "compute_ms": compute_s * 1000}
