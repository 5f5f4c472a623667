"""Choosing between a serial and a parallel kernel by what each costs now.

numba's parallel regions win on an idle machine and stall when another process keeps a core
busy: every region waits for its slowest thread, and a thread sharing a core with a busy
process waits for a time slice (measured at an 8k context: attention's parallel kernel made
decode 3.8x slower with one core busy, the serial one 1.3x; docs/benchmarks.md). A laptop is
often busy, so the choice is made by measurement, call by call: `KernelChoice` keeps the cost
per unit of work of the kernel in use (a moving average) and now and then times the other one
once; it switches when the other was cheaper. Trials of a kernel that keeps losing come ever
more rarely (FIRST_TRIAL, doubling up to LAST_TRIAL calls apart), so a busy machine pays
little for them, and a change of load is still noticed within LAST_TRIAL calls.
"""

from __future__ import annotations

FIRST_TRIAL = 16  # calls until the other kernel is tried, after a switch
LAST_TRIAL = 1024  # longest wait between trials
SMOOTHING = 0.25  # weight of a new timing in the moving average


class KernelChoice:
    """Serial (False) or parallel (True); `choose()` before a call, `record()` after it."""

    def __init__(self, parallel_first: bool = True):
        self.current = parallel_first
        self.cost: dict[bool, float | None] = {False: None, True: None}  # seconds per unit
        self.wait = FIRST_TRIAL  # calls between trials of the other kernel
        self.countdown = 2  # the other kernel is timed on the second call

    def choose(self) -> bool:
        self.countdown -= 1
        return (not self.current) if self.countdown <= 0 else self.current

    def record(self, parallel: bool, seconds: float, units: float) -> None:
        cost = seconds / max(units, 1.0)
        if parallel == self.current:
            old = self.cost[parallel]
            self.cost[parallel] = cost if old is None else old + SMOOTHING * (cost - old)
            return
        self.cost[parallel] = cost  # a trial: the other kernel's cost now
        current = self.cost[self.current]
        if current is not None and cost < current:
            self.current, self.wait = parallel, FIRST_TRIAL
        else:
            self.wait = min(2 * self.wait, LAST_TRIAL)
        self.countdown = self.wait
