"""Neuron selectors: which FFN neurons one token computes (the others count as zero).

Gate-first is exact: it computes act(gate . x) for every neuron from resident gate rows and
keeps those whose magnitude passes the layer's calibrated threshold (CATS). Predicted (LLM in
a flash) runs a rank-r predictor x A B of the gate and keeps neurons whose predicted |act|
passes a threshold set on calibration data for high recall; unselected neurons cost nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..store.reader import TensorEntry
from .stored import BundledFFN


def gate_rows_nbytes(entry: TensorEntry) -> int:
    """DRAM a gate-first selector takes when the FFN is not resident: every bundle's gate row."""
    return entry.rows * (entry.row_nbytes // 3)


def predictor_dram_nbytes(hidden: int, ffn: int, rank: int) -> int:
    """DRAM a predicted selector takes: its float32 A (hidden x rank) and B (rank x ffn)."""
    return 4 * rank * (hidden + ffn)


class GateFirstSelector:
    """`gates`: rows whose first encoded row is a neuron's gate (the bundles, or gate rows)."""

    def __init__(self, gates: BundledFFN, threshold: float):
        self.gates, self.threshold = gates, threshold

    def select(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The selected neurons (sorted ids) and their act(gate . x)."""
        act = self.gates.gate_activations(x)
        ids = np.flatnonzero(np.abs(act) > self.threshold)
        return ids, act[ids]


class PredictedSelector:
    def __init__(self, a: np.ndarray, b: np.ndarray, threshold: float,
                 activation_fn: Callable[[np.ndarray], np.ndarray]):
        self.a, self.b, self.threshold, self.activation_fn = a, b, threshold, activation_fn

    def select(self, x: np.ndarray) -> tuple[np.ndarray, None]:
        """The selected neurons (sorted ids); their gates are computed with them."""
        predicted = self.activation_fn((x @ self.a) @ self.b)
        return np.flatnonzero(np.abs(predicted) > self.threshold), None
