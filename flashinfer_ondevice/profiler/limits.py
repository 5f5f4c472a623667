"""Running a command under a memory limit that counts page cache, as a small device would.

Enforcement, best first: a cgroup v2 child with `memory.max` (where this process may enable
the memory controller for its cgroup's children), a cgroup v1 memory child
(`memory.limit_in_bytes`); else none, and the child still runs while its peak resident memory
is watched with psutil (reported as "not enforced, peak measured"). The model's files are
evicted from the page cache first (posix_fadvise DONTNEED, and drop_caches where allowed), so
the first token reads from storage. A child the kernel kills for memory comes back as
`oom_killed`, never as an exception.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

CGROUP_ROOT = Path("/sys/fs/cgroup")
WATCH_SECONDS = 0.02  # how often an unenforced child's memory is sampled


@dataclass(frozen=True)
class Enforcement:
    kind: str  # "cgroup v2", "cgroup v1" or "none"
    parent: Path | None  # where child cgroups are made
    reason: str  # what was found, or why nothing can be enforced

    @property
    def enforced(self) -> bool:
        return self.parent is not None


@dataclass
class ChildRun:
    returncode: int | None  # None: timed out
    stdout: str
    stderr: str
    seconds: float
    limit: int | None
    enforced: bool
    cgroup_peak: int | None  # the cgroup's peak (page cache included), where enforced
    watched_peak: int  # the child's peak resident memory as sampled
    oom_killed: bool
    trace: list[tuple[float, int, int | None]]  # (seconds, RSS, cgroup usage) as sampled


def _own_cgroup(version: str) -> str | None:
    """This process's cgroup path (v2: the '0::' line; v1: the memory controller's)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        number, controllers, path = line.split(":", 2)
        if (version == "v2" and number == "0") or \
                (version == "v1" and "memory" in controllers.split(",")):
            return path
    return None


def detect() -> Enforcement:
    """The best way this machine lets this process limit a child's memory."""
    try:
        controllers = (CGROUP_ROOT / "cgroup.controllers").read_text().split()
    except OSError:
        controllers = []
    if "memory" in controllers:
        own = _own_cgroup("v2")
        base = CGROUP_ROOT / (own or "/").lstrip("/")
        subtree = base / "cgroup.subtree_control"
        try:
            if "memory" not in subtree.read_text().split():
                subtree.write_text("+memory")
            if os.access(base, os.W_OK):
                return Enforcement("cgroup v2", base, f"memory.max under {base}")
        except OSError as error:
            reason = f"cgroup v2 memory controller not writable here ({error.strerror})"
        else:
            reason = f"cgroup v2: {base} is not writable"
    elif (CGROUP_ROOT / "memory").is_dir():
        own = _own_cgroup("v1") or "/"
        base = CGROUP_ROOT / "memory" / own.lstrip("/")
        if os.access(base, os.W_OK):
            return Enforcement("cgroup v1", base, f"memory.limit_in_bytes under {base}")
        reason = f"cgroup v1: {base} is not writable"
    else:
        reason = "no cgroup memory controller (not Linux, or not mounted)"
    return Enforcement("none", None, reason + "; not enforced, peak measured")


def evict(paths: list[Path]) -> None:
    """Drop `paths` (files, or every file under a folder) from the page cache."""
    files = []
    for path in paths:
        files += [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    for file in files:
        with contextlib.suppress(OSError):
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    with contextlib.suppress(OSError):
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1")


def _make_cgroup(enforcement: Enforcement, limit: int) -> Path:
    group = enforcement.parent / f"fi-profile-{os.getpid()}-{time.monotonic_ns()}"
    group.mkdir()
    if enforcement.kind == "cgroup v2":
        (group / "memory.max").write_text(str(limit))
        with contextlib.suppress(OSError):
            (group / "memory.swap.max").write_text("0")
    else:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        with contextlib.suppress(OSError):
            (group / "memory.memsw.limit_in_bytes").write_text(str(limit))
    return group


def _cgroup_figures(enforcement: Enforcement, group: Path) -> tuple[int | None, bool]:
    """(peak bytes, whether the OOM killer struck) of a finished child's cgroup."""
    v2 = enforcement.kind == "cgroup v2"
    peak = None
    with contextlib.suppress(OSError, ValueError):
        peak = int((group / ("memory.peak" if v2 else "memory.max_usage_in_bytes"))
                   .read_text())
    kills = 0
    with contextlib.suppress(OSError, ValueError):
        for line in (group / ("memory.events" if v2 else "memory.oom_control")).read_text() \
                .splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                kills = int(value)
    return peak, kills > 0


class _Watcher(threading.Thread):
    """Samples a process tree's resident memory (and its cgroup's usage, page cache
    included, where it has one) until it exits."""

    def __init__(self, pid: int, usage: Path | None):
        super().__init__(daemon=True)
        self.pid, self.usage, self.peak = pid, usage, 0
        self.trace: list[tuple[float, int, int | None]] = []
        self.done = threading.Event()

    def run(self) -> None:
        start = time.perf_counter()
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(self.pid)
            while not self.done.is_set():
                with contextlib.suppress(psutil.Error):
                    rss = sum(p.memory_info().rss
                              for p in [process, *process.children(recursive=True)])
                    self.peak = max(self.peak, rss)
                    self.trace.append((time.perf_counter() - start, rss, self._usage()))
                self.done.wait(WATCH_SECONDS)

    def _usage(self) -> int | None:
        if self.usage is None:
            return None
        try:
            return int(self.usage.read_text())
        except (OSError, ValueError):
            return None


def run_limited(cmd: list[str], limit: int | None, enforcement: Enforcement,
                cold: list[Path] = (), timeout: float | None = None,
                env: dict | None = None) -> ChildRun:
    """Run `cmd` with at most `limit` bytes (page cache included) where `enforcement` can
    enforce it, after evicting `cold` from the page cache."""
    evict(list(cold))
    group = None
    if limit is not None and enforcement.enforced:
        group = _make_cgroup(enforcement, limit)
        # the child joins the cgroup before it execs the command
        cmd = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(group), *cmd]
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env, start_new_session=True)
    usage = None if group is None else group / (
        "memory.current" if enforcement.kind == "cgroup v2" else "memory.usage_in_bytes")
    watcher = _Watcher(child.pid, usage)
    watcher.start()
    try:
        stdout, stderr = child.communicate(timeout=timeout)
        returncode = child.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(child.pid, 9)
        stdout, stderr = child.communicate()
        returncode = None
    finally:
        watcher.done.set()
        watcher.join()
    seconds = time.perf_counter() - start
    peak, oom = None, False
    if group is not None:
        peak, oom = _cgroup_figures(enforcement, group)
        with contextlib.suppress(OSError):
            group.rmdir()
    return ChildRun(returncode, stdout, stderr, seconds, limit, group is not None, peak,
                    watcher.peak, oom or returncode == -9 and group is not None,
                    watcher.trace)
