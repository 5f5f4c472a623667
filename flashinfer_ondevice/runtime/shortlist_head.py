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

from collections.abc import Callable

import numpy as np

from ..memory import aligned_buffer, release_pages
from ..store.format import align_up
from ..store.head_proxy import BASIS, RESIDUAL, SCORES
from ..store.io import DirectReader
from ..store.reader import TensorEntry, corrupt
from .stored import StoredMatrix

CANDIDATES = 1024  # output-layer candidates computed exactly per position
SCRATCH = 4 << 20  # aligned buffer the candidates' pages are read through
RING_SCRATCH = 1 << 20  # a free I/O ring buffer this large serves as that buffer instead


class ShortlistHead:
    def __init__(self, proxy: dict[str, TensorEntry], resident: StoredMatrix,
                 entry: TensorEntry, reader: DirectReader, candidates: int,
                 free_buffer: Callable[[], np.ndarray] | None):
        # the proxy's own file, read on this reader (its bytes counted with the model's)
        self._proxy_reader = DirectReader(proxy[SCORES].path, threads=8, stats=reader.stats)
        self.basis = self._read_f32(proxy[BASIS])  # (rank, hidden)
        self.residual = self._read_f32(proxy[RESIDUAL])  # (hidden, hidden): error moment
        if not (np.isfinite(self.basis).all() and np.isfinite(self.residual).all()):
            raise corrupt(proxy[BASIS].path.parent, f"its output-layer proxy "
                          f"({proxy[BASIS].path.name}) holds NaN or infinite values")
        self._scores_entry = proxy[SCORES]
        self._scores_buffer = aligned_buffer(align_up(self._scores_entry.nbytes))
        self._load_scores()
        self.scores = StoredMatrix(  # (vocab, rank) codec bytes
            self._scores_buffer[:self._scores_entry.nbytes].reshape(self._scores_entry.rows, -1),
            self._scores_entry.codec, self._scores_entry.cols, resident.backend)
        self._released = False
        self.resident = resident  # the output layer's first rows, in DRAM
        self.entry, self.reader = entry, reader
        self.candidates = min(candidates, entry.rows)
        self.rows = entry.rows
        self._raw = np.empty((self.candidates, entry.row_nbytes), np.uint8)
        # pages the candidates are read into: a free buffer of the I/O ring when the plan
        # streams (planner.py), else a buffer of our own
        self._own_scratch = None if free_buffer else aligned_buffer(SCRATCH)
        self._free_buffer = free_buffer

    @staticmethod
    def planned_nbytes(proxy: dict[str, TensorEntry], entry: TensorEntry, candidates: int,
                       own_scratch: bool) -> int:
        """What a shortlist head allocates: the proxy (basis, residual moment, scores), the
        candidates' rows and, without a free ring buffer, its own read scratch."""
        proxy_nbytes = proxy[BASIS].nbytes + proxy[RESIDUAL].nbytes \
            + align_up(proxy[SCORES].nbytes)
        return proxy_nbytes + min(candidates, entry.rows) * entry.row_nbytes \
            + SCRATCH * own_scratch

    @staticmethod
    def released_nbytes(proxy: dict[str, TensorEntry], own_scratch: bool) -> int:
        """What `release` gives back while a prompt is encoded."""
        return align_up(proxy[SCORES].nbytes) + SCRATCH * own_scratch

    def nbytes(self) -> int:
        own = 0 if self._own_scratch is None else len(self._own_scratch)
        return self.basis.nbytes + self.residual.nbytes + len(self._scores_buffer) \
            + self._raw.nbytes + own

    def _read_f32(self, entry: TensorEntry) -> np.ndarray:
        raw = self._proxy_reader.read(entry.offset, entry.nbytes)
        return raw.view(np.float32).reshape(entry.rows, entry.cols)

    def _load_scores(self) -> None:
        self._proxy_reader.submit([(self._scores_entry.offset, len(self._scores_buffer), 0)],
                                  self._scores_buffer).wait()

    def close(self) -> None:
        self._proxy_reader.close()

    def release(self) -> None:
        """Give the scores' and read buffer's pages back while no forward pass runs (encoding
        a prompt uses their room, planner.py); the next apply reads the scores again."""
        release_pages(self._scores_buffer)
        if self._own_scratch is not None:
            release_pages(self._own_scratch)
        self._released = True

    def apply(self, x: np.ndarray) -> np.ndarray:
        if self._released:
            self._load_scores()
            self._released = False
        x = np.ascontiguousarray(x, dtype=np.float32)
        logits = self.scores.apply(x @ self.basis.T)
        # lognormal correction: the tail's softmax mass stays unbiased (store/head_proxy.py)
        logits += 0.5 * np.einsum("ij,jk,ik->i", x, self.residual, x)[:, None]
        k = self.candidates
        scratch = self._own_scratch if self._free_buffer is None else self._free_buffer()
        for t in range(len(x)):
            best = np.sort(np.argpartition(logits[t], -k)[-k:])
            split = int(np.searchsorted(best, self.resident.rows))
            self._raw[:split] = self.resident.raw[best[:split]]
            self.reader.read_rows(self.entry.offset, self.entry.row_nbytes, best[split:],
                                  scratch, self._raw[split:])
            exact = StoredMatrix(self._raw, self.entry.codec, self.entry.cols,
                                 self.resident.backend)
            logits[t, best] = exact.apply(x[t:t + 1])[0]
        return logits
