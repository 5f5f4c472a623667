"""KVCache: keys and values of every layer for the tokens seen so far.

Storage grows by doubling up to the context size, so a short chat does not pay for a 32k
context up front. Entries are float16 by default (half the memory, and what llama.cpp stores)
or float32.
"""

from __future__ import annotations

import numpy as np

from .config import ModelConfig
from .errors import ContextLengthError

_MIN_CAPACITY = 256


class KVCache:
    def __init__(self, config: ModelConfig, max_tokens: int, dtype: type = np.float16):
        self.max_tokens = max_tokens
        self.length = 0  # tokens stored (the position of the next token)
        self.dtype = np.dtype(dtype)
        self._shape = (config.n_kv_heads, config.head_dim)
        self.keys = [np.empty((0, *self._shape), dtype) for _ in range(config.n_layers)]
        self.values = [np.empty((0, *self._shape), dtype) for _ in range(config.n_layers)]

    @staticmethod
    def planned_nbytes(config: ModelConfig, max_tokens: int, dtype: type = np.float16) -> int:
        """What a cache of `max_tokens` holds once full (the planner reserves this)."""
        per_token = 2 * config.n_layers * config.n_kv_heads * config.head_dim
        return per_token * max_tokens * np.dtype(dtype).itemsize

    def reserve(self, n_new: int) -> None:
        """Make room for `n_new` more tokens, or fail if the context would overflow."""
        needed = self.length + n_new
        if needed > self.max_tokens:
            raise ContextLengthError(
                f"context full: {needed} tokens needed, context size is {self.max_tokens}")
        capacity = len(self.keys[0])
        if needed <= capacity:
            return
        new_capacity = min(self.max_tokens, max(_MIN_CAPACITY, 2 * capacity, needed))
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = np.empty((new_capacity, *self._shape), self.dtype)
                grown[:self.length] = old[:self.length]
                store[i] = grown

    def update(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Store `k`, `v` (new tokens at positions length..); return all keys and values as
        float32 (float16 entries widen exactly)."""
        end = self.length + len(k)
        self.keys[layer][self.length:end] = k
        self.values[layer][self.length:end] = v
        return (self.keys[layer][:end].astype(np.float32, copy=False),
                self.values[layer][:end].astype(np.float32, copy=False))

    def advance(self, n_new: int) -> None:
        self.length += n_new

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.keys) + sum(a.nbytes for a in self.values)
