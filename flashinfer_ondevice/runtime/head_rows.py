"""The output layer's rows as the store keeps them: one tensor, or a tied embedding split by
token into two tiers (store/vocab_tiers.py: the hot rows, then the cold ones, each tier in
its own codec). Rows are numbered in that stored order: the planner keeps a prefix of them
resident, the streamed weights read any range (split where the tiers meet), and the logits
computed in stored order are put back in token order with `order`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..store.reader import Store, TensorEntry
from ..store.vocab_tiers import COLD, VocabTiers
from .stored import row_ranges


@dataclass(frozen=True)
class HeadRows:
    tiers: tuple[TensorEntry, ...]  # one entry, or the hot and cold tiers
    vocab_tiers: VocabTiers | None  # the store's record, when `tiers` are two

    @classmethod
    def of(cls, store: Store, head: str) -> HeadRows:
        """The rows of `head` ("embed" when tied, else "output") in `store`."""
        if store.vocab_tiers is None or head != "embed":
            return cls((store.tensors[head],), None)
        return cls((store.tensors["embed"], store.tensors[COLD]), store.vocab_tiers)

    @property
    def rows(self) -> int:
        """Every row: the vocabulary."""
        return sum(e.rows for e in self.tiers)

    @property
    def order(self) -> np.ndarray | None:
        """The token of each stored row; None where stored order is token order."""
        return None if self.vocab_tiers is None else self.vocab_tiers.order

    @property
    def index_nbytes(self) -> int:
        """Memory the maps between tokens and stored rows take while the store runs."""
        return 0 if self.vocab_tiers is None else self.vocab_tiers.index_nbytes

    def parts(self, start: int, end: int) -> list[tuple[TensorEntry, int, int]]:
        """Stored rows [start, end) as (tier, first row, end row) within each tier."""
        return [(self.tiers[k], lo, hi)
                for k, lo, hi in row_ranges([e.rows for e in self.tiers], start, end)]

    def nbytes(self, start: int, end: int) -> int:
        """Codec bytes of stored rows [start, end)."""
        return sum((hi - lo) * e.row_nbytes for e, lo, hi in self.parts(start, end))

    def fitting(self, start: int, room: int) -> int:
        """How many stored rows from `start` on fit in `room` bytes."""
        count = 0
        for entry, lo, hi in self.parts(start, self.rows):
            take = min(hi - lo, max(room, 0) // entry.row_nbytes)
            count += take
            room -= take * entry.row_nbytes
            if take < hi - lo:
                break
        return count
