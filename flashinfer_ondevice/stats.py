"""Run counters: what a run from a flash store read, waited for and did with its neuron
caches. The store's reader counts reads, the runtime counts neurons, generation reports the
difference between two snapshots per response."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace


@dataclass
class IOStats:
    """Counters of a run from a store: reads, and the sparse FFN's neuron bookkeeping."""

    bytes_read: int = 0
    reads: int = 0
    wait_seconds: float = 0.0  # waiting for reads
    neurons_needed: int = 0  # FFN neurons the selectors chose
    neuron_hits: int = 0  # of those, already in a neuron cache
    neurons_read: int = 0  # read from the store into a neuron cache
    cache_seconds: float = 0.0  # selecting neurons and managing the caches (not reads)

    def snapshot(self) -> IOStats:
        return replace(self)

    def since(self, earlier: IOStats) -> IOStats:
        return IOStats(*(getattr(self, f.name) - getattr(earlier, f.name) for f in fields(self)))
