"""The output layer under a shortlist plan: score every token cheaply, compute the best exactly.

Per position: the resident low-rank proxy (store/head_proxy.py) scores the whole vocabulary,
the `candidates` best-scoring tokens get exact logits from their rows of the output layer
(resident rows from DRAM, the others read from the store, page-coalesced), and every other
token keeps its proxy score (plus half the proxy's error variance: the correction that keeps
their softmax mass unbiased, store/head_proxy.py). Greedy decoding and top-k/top-p sampling
thus see exact logits wherever the probability mass is; how often the exact argmax falls
outside the shortlist is measured with `run-model eval --compare-dense` (docs/benchmarks.md).
"""

from __future__ import annotations

import numpy as np

from ..store.io import DirectReader, aligned_buffer
from ..store.reader import TensorEntry
from .stored import StoredMatrix


class ShortlistHead:
    def __init__(self, basis: np.ndarray, residual: np.ndarray, scores: StoredMatrix,
                 resident: StoredMatrix,
                 entry: TensorEntry, reader: DirectReader, candidates: int,
                 scratch_nbytes: int):
        self.basis = basis  # (rank, hidden) float32
        self.residual = residual  # (hidden, hidden) float32: the proxy error's second moment
        self.scores = scores  # (vocab, rank) codec bytes
        self.resident = resident  # the output layer's first rows, in DRAM
        self.entry, self.reader = entry, reader
        self.candidates = min(candidates, entry.rows)
        self.rows = entry.rows
        self._raw = np.empty((self.candidates, entry.row_nbytes), np.uint8)
        self.scratch = aligned_buffer(scratch_nbytes)  # pages the candidates are read into

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        logits = self.scores.apply(x @ self.basis.T)
        # lognormal correction: the tail's softmax mass stays unbiased (store/head_proxy.py)
        logits += 0.5 * np.einsum("ij,jk,ik->i", x, self.residual, x)[:, None]
        k = self.candidates
        for t in range(len(x)):
            best = np.sort(np.argpartition(logits[t], -k)[-k:])
            split = int(np.searchsorted(best, self.resident.rows))
            self._raw[:split] = self.resident.raw[best[:split]]
            self.reader.read_rows(self.entry.offset, self.entry.row_nbytes, best[split:],
                                  self.scratch, self._raw[split:])
            exact = StoredMatrix(self._raw, self.entry.codec, self.entry.cols)
            logits[t, best] = exact.apply(x[t:t + 1])[0]
        return logits
