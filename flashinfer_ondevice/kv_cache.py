"""KVCache: keys and values of every layer, stored once in their cache type and read in place.

Layout per layer: (kv_heads, slots, head_dim), so attention reads one head's keys as one
contiguous run. Global (full-attention) layers have a slot per position of the context;
sliding-window layers keep a ring of `sliding_window` slots (position p in slot p % window),
since no query ever looks further back. The arrays are allocated at full size with np.empty:
the OS commits their pages as tokens are written, so a short chat does not pay for a 32k
context and nothing is ever copied to grow.

Cache types (CACHE_TYPES): "f16" (what llama.cpp stores by default), "q8" (int8 with one
float32 scale per head per token: half of f16), and "f32" for the float reference engines.
Attention (backends/) reads the stored form through `KVEntries`; nothing widens the cache to
float32 per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ModelConfig
from .errors import ContextLengthError, FlashInferError

CACHE_TYPES = {"f32": np.float32, "f16": np.float16, "q8": np.int8}  # type -> stored dtype
SCALE_DTYPE = np.float32  # q8: one scale per head per token
Q8_MAX = 127.0


def check_cache_type(cache_type: str) -> str:
    if cache_type not in CACHE_TYPES:
        raise FlashInferError(f"unknown KV cache type '{cache_type}' "
                              f"(choose from {', '.join(CACHE_TYPES)})")
    return cache_type


def encode(x: np.ndarray, cache_type: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(tokens, kv_heads, head_dim) float32 -> stored (kv_heads, tokens, head_dim) and, for
    q8, the scales (kv_heads, tokens): x ~= data * scale, data in -127..127."""
    x = x.transpose(1, 0, 2)
    if cache_type != "q8":
        return np.ascontiguousarray(x, CACHE_TYPES[cache_type]), None
    x = np.ascontiguousarray(x, np.float32)
    scale = (np.abs(x).max(axis=2) / np.float32(Q8_MAX)).astype(SCALE_DTYPE)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    data = np.clip(np.rint(x / safe[..., None]), -Q8_MAX, Q8_MAX).astype(np.int8)
    return data, scale


@dataclass
class KVEntries:
    """Keys and values as attention reads them, in their stored type and (for decode) where
    they are stored: entries 0..n along axis 1 of keys/values (kv_heads, slots, head_dim),
    C-contiguous (the arrays may have more slots than n); scales (kv_heads, slots) for q8,
    else None; positions (slots,) the position held by each slot (a ring's are not in
    order)."""

    keys: np.ndarray
    values: np.ndarray
    key_scales: np.ndarray | None
    value_scales: np.ndarray | None
    positions: np.ndarray
    n: int

    @property
    def cache_type(self) -> str:
        if self.key_scales is not None:
            return "q8"
        return "f16" if self.keys.dtype == np.float16 else "f32"

    def keys_f32(self, start: int, end: int) -> np.ndarray:
        """Entries start..end (<= n) of the keys as float32 (kv_heads, end - start, head_dim)."""
        return _widen(self.keys[:, start:end],
                      None if self.key_scales is None else self.key_scales[:, start:end])

    def values_f32(self, start: int, end: int) -> np.ndarray:
        return _widen(self.values[:, start:end],
                      None if self.value_scales is None else self.value_scales[:, start:end])


def _widen(data: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    if scales is None:
        return data.astype(np.float32, copy=False)
    return data.astype(np.float32) * scales[..., None]


class _LayerCache:
    """One layer's keys and values: `slots` entries, a ring when `window` is set."""

    def __init__(self, slots: int, kv_heads: int, head_dim: int, cache_type: str,
                 window: int | None):
        dtype = CACHE_TYPES[cache_type]
        self.window = window
        self.keys = np.empty((kv_heads, slots, head_dim), dtype)
        self.values = np.empty((kv_heads, slots, head_dim), dtype)
        quantized = cache_type == "q8"
        self.key_scales = np.empty((kv_heads, slots), SCALE_DTYPE) if quantized else None
        self.value_scales = np.empty((kv_heads, slots), SCALE_DTYPE) if quantized else None
        self.positions = np.arange(slots, dtype=np.int64)  # position held by each slot

    def arrays(self) -> list[np.ndarray]:
        return [a for a in (self.keys, self.values, self.key_scales, self.value_scales)
                if a is not None]

    def write(self, slots: slice | np.ndarray, k: tuple, v: tuple,
              positions: np.ndarray) -> None:
        self.keys[:, slots], self.values[:, slots] = k[0], v[0]
        if self.key_scales is not None:
            self.key_scales[:, slots], self.value_scales[:, slots] = k[1], v[1]
        self.positions[slots] = positions

    def view(self, n: int) -> KVEntries:
        """Slots 0..n where they are stored."""
        return KVEntries(self.keys, self.values, self.key_scales, self.value_scales,
                         self.positions, n)

    def gather(self, slots: np.ndarray) -> KVEntries:
        """A copy of `slots`, in their order."""
        def take(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else np.ascontiguousarray(a[:, slots])
        return KVEntries(take(self.keys), take(self.values), take(self.key_scales),
                         take(self.value_scales), self.positions[slots], len(slots))


def _concat(old: KVEntries, new_k: tuple, new_v: tuple, positions: np.ndarray) -> KVEntries:
    def cat(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else np.concatenate([a, b], axis=1)
    return KVEntries(cat(old.keys, new_k[0]), cat(old.values, new_v[0]),
                     cat(old.key_scales, new_k[1]), cat(old.value_scales, new_v[1]),
                     np.concatenate([old.positions, positions]), old.n + len(positions))


class KVCache:
    def __init__(self, config: ModelConfig, max_tokens: int, cache_type: str = "f16"):
        self.max_tokens = max_tokens
        self.length = 0  # tokens stored (the position of the next token)
        self.cache_type = check_cache_type(cache_type)
        self.layers = [
            _LayerCache(slots, config.n_kv_heads, config.head_dim, cache_type, window)
            for slots, window in _layer_slots(config, max_tokens)]

    @staticmethod
    def planned_nbytes(config: ModelConfig, max_tokens: int, cache_type: str = "f16") -> int:
        """What the cache holds once full (the planner reserves this)."""
        per_slot = 2 * config.n_kv_heads * (
            config.head_dim * np.dtype(CACHE_TYPES[check_cache_type(cache_type)]).itemsize
            + (np.dtype(SCALE_DTYPE).itemsize if cache_type == "q8" else 0))
        return per_slot * sum(slots for slots, _ in _layer_slots(config, max_tokens))

    def reserve(self, n_new: int) -> None:
        """Fail before any work if `n_new` more tokens would overflow the context."""
        needed = self.length + n_new
        if needed > self.max_tokens:
            raise ContextLengthError(
                f"context full: {needed} tokens needed, context size is {self.max_tokens}")

    def store(self, layer: int, k: np.ndarray, v: np.ndarray) -> KVEntries:
        """Store `k`, `v` (tokens, kv_heads, head_dim) of the positions length.. of `layer`;
        return the entries their queries attend to. One token reads the cache in place; a
        window layer given several tokens returns a gathered copy of the window before them
        plus them (the ring is overwritten by the end of the batch)."""
        layer_cache = self.layers[layer]
        start, end = self.length, self.length + len(k)
        positions = np.arange(start, end, dtype=np.int64)
        new_k, new_v = encode(k, self.cache_type), encode(v, self.cache_type)
        window = layer_cache.window
        if window is None:
            layer_cache.write(slice(start, end), new_k, new_v, positions)
            return layer_cache.view(end)
        if len(k) == 1:
            layer_cache.write(slice(start % window, start % window + 1), new_k, new_v,
                              positions)
            return layer_cache.view(min(end, window))
        first_old = max(0, start - window + 1)
        entries = _concat(layer_cache.gather(np.arange(first_old, start) % window), new_k,
                          new_v, positions)
        kept = slice(max(0, len(k) - window), len(k))  # the batch's last `window` tokens
        layer_cache.write(positions[kept] % window, _tail(new_k, kept), _tail(new_v, kept),
                          positions[kept])
        return entries

    def advance(self, n_new: int) -> None:
        self.length += n_new

    def nbytes(self) -> int:
        """Bytes allocated (committed by the OS as tokens are written)."""
        return sum(a.nbytes for layer in self.layers for a in layer.arrays())

    def used_nbytes(self) -> int:
        """Bytes of the slots written so far."""
        return sum(a.nbytes // len(layer.positions) * min(self.length, len(layer.positions))
                   for layer in self.layers for a in layer.arrays())


def _tail(stored: tuple, kept: slice) -> tuple:
    return tuple(None if a is None else a[:, kept] for a in stored)


def _layer_slots(config: ModelConfig, max_tokens: int) -> list[tuple[int, int | None]]:
    """(slots, window or None) of each layer for a `max_tokens` context."""
    out = []
    for i in range(config.n_layers):
        if config.is_local_layer(i):
            out.append((min(config.sliding_window, max_tokens), config.sliding_window))
        else:
            out.append((max_tokens, None))
    return out
