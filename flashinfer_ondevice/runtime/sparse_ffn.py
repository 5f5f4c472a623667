"""A layer's FFN under activation sparsity: per token, compute only the selected neurons.

The bundles come from DRAM when the whole FFN is resident, else from the layer's windowed
neuron cache, which reads the neurons it lacks from the store. Every token is handled alone
(prefill too), so a prompt and a generated token see the same sparsity.
"""

from __future__ import annotations

import numpy as np

from ..stats import IOStats
from .neuron_cache import NeuronCache
from .selectors import GateFirstSelector, PredictedSelector
from .stored import BundledFFN


class SparseFFN:
    def __init__(self, selector: GateFirstSelector | PredictedSelector, hidden: int,
                 stats: IOStats, bundles: BundledFFN | None = None,
                 cache: NeuronCache | None = None):
        self.selector, self.hidden, self.stats = selector, hidden, stats
        self.bundles, self.cache = bundles, cache

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty((len(x), self.hidden), np.float32)
        for t, row in enumerate(x):
            needed, gate_act = self.selector.select(row)
            if self.cache is not None:
                out[t] = self.cache.apply(row, needed, gate_act)
            else:
                self.stats.neurons_needed += len(needed)
                self.stats.neuron_hits += len(needed)
                out[t] = self.bundles.apply_rows(row, needed, gate_act)
        return out
