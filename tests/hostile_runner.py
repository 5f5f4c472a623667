"""Run one hostile-input case in a child process under limits, and judge what came out.

A case is a `run-model` command line or a snippet of Python against the public API. The child
runs with a wall-clock limit (a hang is a failure), its peak RSS is read from the kernel's
accounting of it and its descendants (wait4), and a child above the memory cap is killed on
the spot. The verdict requires, for bad input, a non-zero exit with one line naming the cause
and no traceback; for good input, exit 0 and the expected output; never a signal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

TIME_LIMIT = 60.0  # seconds per case
MEMORY_LIMIT = 1536 << 20  # peak RSS per case (the child and its own children)
_POLL = 0.02
CLOSED = "\0closed"  # a case's stdin: the child starts with file descriptor 0 closed

# The API harness: the project's own errors become one line and exit 1; anything else
# escapes as a traceback, which the verdict refuses.
_API_HARNESS = """
import sys
from flashinfer_ondevice.errors import FlashInferError
try:
    exec(compile(sys.argv[1], "<case>", "exec"), {"__name__": "__case__"})
except FlashInferError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(1)
"""


@dataclass
class Outcome:
    returncode: int | None  # None: killed by the runner (time or memory)
    stdout: str
    stderr: str
    seconds: float
    peak_rss: int  # bytes
    killed_for: str = ""  # "time" or "memory" when the runner killed it


def command_for(kind: str, args: list[str]) -> list[str]:
    """argv of a case: kind "cli" runs `run-model args...`, "api" runs args[0] as code."""
    if kind == "cli":
        return [sys.executable, "-m", "flashinfer_ondevice.cli", *args]
    if kind == "api":
        return [sys.executable, "-c", _API_HARNESS, args[0]]
    raise ValueError(f"unknown case kind {kind}")


def _tree_rss(pid: int) -> int:
    try:
        process = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])
    except psutil.Error:
        return 0


def _kill_tree(pid: int) -> None:
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        children = []
    for p in [*children]:
        with contextlib.suppress(psutil.Error):
            p.kill()
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)


def run(argv: list[str], cwd: Path, env: dict[str, str], stdin: str | None = None,
        time_limit: float = TIME_LIMIT, memory_limit: int = MEMORY_LIMIT) -> Outcome:
    """Run `argv` in `cwd`; stdin is `stdin` (None: empty; CLOSED: no file descriptor 0)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.TemporaryFile() as inp:
        if stdin not in (None, CLOSED):
            inp.write(stdin.encode())
            inp.seek(0)
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=err,
                                   stdin=inp if stdin not in (None, CLOSED)
                                   else subprocess.DEVNULL,
                                   preexec_fn=(lambda: os.close(0)) if stdin == CLOSED
                                   else None, start_new_session=True)
        start = time.monotonic()
        killed_for, peak, status, rusage = "", 0, None, None
        while True:
            pid, status, rusage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            rss = _tree_rss(process.pid)
            peak = max(peak, rss)
            if time.monotonic() - start > time_limit:
                killed_for = "time"
            elif rss > memory_limit:
                killed_for = "memory"
            if killed_for:
                _kill_tree(process.pid)
                _, status, rusage = os.wait4(process.pid, 0)
                break
            time.sleep(_POLL)
        process.returncode = 0  # reaped by wait4 above: keep Popen from waiting again
        seconds = time.monotonic() - start
        peak = max(peak, rusage.ru_maxrss * 1024)
        out.seek(0)
        err.seek(0)
        code = None if killed_for else os.waitstatus_to_exitcode(status)
        return Outcome(code, out.read().decode(errors="replace"),
                       err.read().decode(errors="replace"), seconds, peak, killed_for)


def verdict(outcome: Outcome, expect: str, cause: str, memory_limit: int = MEMORY_LIMIT
            ) -> str | None:
    """None if the outcome is what the case expects, else why not (one line)."""
    if outcome.killed_for == "time":
        return f"hang: still running after {outcome.seconds:.0f} s"
    if outcome.killed_for == "memory" or outcome.peak_rss > memory_limit:
        return f"memory blow-up: peak RSS {outcome.peak_rss >> 20} MiB"
    code = outcome.returncode
    if code is not None and code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    if "Traceback" in outcome.stderr:
        return f"traceback: {outcome.stderr.strip().splitlines()[-1]}"
    if "(a bug" in outcome.stderr:  # the CLI's and the convert child's net for bugs
        return f"a bug caught as one line: {outcome.stderr.strip().splitlines()[-1]}"
    if expect == "ok":
        if code != 0:
            return f"exit {code} on valid input: {outcome.stderr.strip()[-300:]}"
        if cause.lower() not in outcome.stdout.lower():
            return f"output lacks {cause!r}: {outcome.stdout[-300:]!r}"
        return None
    if code == 0:
        return f"exit 0 on bad input (stdout {outcome.stdout[-200:]!r})"
    # stderr may carry information first (the memory plan; click's usage lines); the error
    # is one line, the last, starting "Error:" (the CLI) or "error:" (the API harness)
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.lower().startswith("error:")]
    if len(errors) != 1 or lines[-1] != errors[0]:
        return f"{len(errors)} error lines, want 1 at the end: {outcome.stderr.strip()[-400:]!r}"
    lines = errors
    if "\x1b" in lines[0] or any(ord(c) < 32 and c != "\t" for c in lines[0]):
        return f"control characters in the error line: {lines[0]!r}"
    if cause.lower() not in lines[0].lower():
        return f"error line does not name {cause!r}: {lines[0]!r}"
    return None
