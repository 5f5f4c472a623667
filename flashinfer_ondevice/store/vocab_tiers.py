"""A tied embedding kept at two precisions, by token (the manifest's "vocab_tiers" record).

The tokens a model predicts most often (convert ranks them by their mean predicted
probability on the calibration text, build/vocab_tiers.py) keep their rows in a wide codec;
every other token's row is in a narrow one. On this model 32,768 of 262,144 tokens hold 97%
of held-out text's tokens, and most of the output distribution's mass.

    tensors["embed"]       the hot tokens' rows, by ascending token id, in the hot codec
    tensors[COLD]          every other token's row, by ascending token id, the cold codec
    manifest["vocab_tiers"] = {"hot": base64 of the hot tokens' bitmap (numpy packbits,
                               vocab bits, first token in the high bit)}

The output layer's rows in *stored order* are the hot rows, then the cold ones: the engine
computes logits in that order and scatters them to token order (`order`); a token's input
embedding is stored row `row_of[token]`. The bitmap is validated before any use: its length,
its count against the hot tensor's rows, and that both tiers are non-empty.
"""

from __future__ import annotations

import base64
import binascii
import functools
from dataclasses import dataclass

import numpy as np

RECORD = "vocab_tiers"
COLD = "embed_cold"


@dataclass(frozen=True)
class VocabTiers:
    """A validated record: which tokens are hot, and (built on first use, so that a plan made
    after opening the store counts them) the maps between tokens and stored rows."""

    hot: np.ndarray  # bool (vocab,): the tokens whose rows are in the hot tier
    hot_rows: int  # how many (the first stored rows)

    @classmethod
    def from_mask(cls, hot: np.ndarray) -> VocabTiers:
        return cls(hot, int(hot.sum()))

    @functools.cached_property
    def order(self) -> np.ndarray:
        """int32 (vocab,): the token of each stored row."""
        return np.concatenate([np.flatnonzero(self.hot),
                               np.flatnonzero(~self.hot)]).astype(np.int32)

    @functools.cached_property
    def row_of(self) -> np.ndarray:
        """int32 (vocab,): the stored row of each token."""
        row_of = np.empty(len(self.hot), np.int32)
        row_of[self.order] = np.arange(len(self.hot), dtype=np.int32)
        return row_of

    @property
    def index_nbytes(self) -> int:
        """What `order` and `row_of` hold in memory while the store runs."""
        return 2 * 4 * len(self.hot)


def record(hot: np.ndarray) -> dict[str, str]:
    """The manifest record of a boolean mask of hot tokens."""
    return {"hot": base64.b64encode(np.packbits(hot).tobytes()).decode("ascii")}


def parse(raw: object, vocab: int) -> VocabTiers:
    """Validate manifest["vocab_tiers"] for a `vocab`-token model; raises ValueError."""
    if not isinstance(raw, dict) or not isinstance(raw.get("hot"), str):
        raise ValueError(f"{RECORD} is not a record with a 'hot' bitmap")
    text = raw["hot"]
    if len(text) != 4 * (((vocab + 7) // 8 + 2) // 3):
        raise ValueError(f"{RECORD}: the hot bitmap does not hold {vocab} tokens")
    try:
        packed = np.frombuffer(base64.b64decode(text, validate=True), np.uint8)
    except (binascii.Error, ValueError):
        raise ValueError(f"{RECORD}: the hot bitmap is not base64") from None
    if len(packed) != (vocab + 7) // 8:
        raise ValueError(f"{RECORD}: the hot bitmap does not hold {vocab} tokens")
    bits = np.unpackbits(packed)
    if bits[vocab:].any():
        raise ValueError(f"{RECORD}: the hot bitmap marks tokens beyond the vocabulary")
    hot = bits[:vocab].astype(bool)
    if not 0 < hot.sum() < vocab:
        raise ValueError(f"{RECORD}: each tier must hold at least one token")
    return VocabTiers.from_mask(hot)
