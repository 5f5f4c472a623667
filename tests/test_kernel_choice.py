"""Serial or parallel by what each costs now: the cheaper kernel is used, a change of load
is followed, and a kernel that keeps losing is tried ever more rarely."""

from __future__ import annotations

from flashinfer_ondevice.backends.kernel_choice import FIRST_TRIAL, LAST_TRIAL, KernelChoice


def drive(choice: KernelChoice, cost: dict[bool, float], calls: int) -> list[bool]:
    """`calls` calls of 1,000 units each, the kernels costing `cost` seconds per unit."""
    used = []
    for _ in range(calls):
        parallel = choice.choose()
        choice.record(parallel, cost[parallel] * 1000, 1000)
        used.append(parallel)
    return used


def test_the_cheaper_kernel_is_used_and_the_other_tried_ever_more_rarely():
    idle = {True: 1e-6, False: 2e-6}  # parallel twice as fast
    choice = KernelChoice()
    used = drive(choice, idle, 4000)
    assert choice.current is True
    trials = [i for i, parallel in enumerate(used) if not parallel]
    assert len(trials) <= 1 + 7  # the first, then 16, 32, ... 1024 calls apart
    gaps = [b - a for a, b in zip(trials, trials[1:], strict=False)]
    assert gaps == sorted(gaps) and gaps[-1] <= LAST_TRIAL + 1


def test_a_busy_machine_moves_the_choice_to_serial_and_back():
    idle, busy = {True: 1e-6, False: 2e-6}, {True: 8e-6, False: 2.5e-6}
    choice = KernelChoice()
    drive(choice, idle, 3000)  # trials now LAST_TRIAL apart
    used = drive(choice, busy, LAST_TRIAL + 2 * FIRST_TRIAL)
    assert choice.current is False
    assert sum(used) <= LAST_TRIAL + FIRST_TRIAL  # the slow kernel stopped within a wait
    used = drive(choice, idle, LAST_TRIAL + 2 * FIRST_TRIAL)
    assert choice.current is True and used[-FIRST_TRIAL:].count(True) >= FIRST_TRIAL - 1


def test_a_single_slow_timing_of_the_kernel_in_use_does_not_switch():
    choice = KernelChoice()
    drive(choice, {True: 1e-6, False: 2e-6}, 100)
    choice.record(True, 3e-6 * 1000, 1000)  # one preempted call, 3x slower
    assert choice.current is True
    assert choice.cost[True] < choice.cost[False]
