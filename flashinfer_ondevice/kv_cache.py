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

Spilling (kv_spill.py): given `resident_tokens` smaller than the context, each global layer
keeps a ring of that many slots too, and the blocks of positions about to be overwritten are
written to the spill file first. A spilled layer hands attention `SpilledEntries`: its ring
in place (slots of positions already spilled hidden by a position no query reaches) and the
spilled blocks, read back a chunk at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import ContextLengthError, FlashInferError
from .kv_spill import BLOCK, SpillFile
from .memory import aligned_buffer
from .stats import IOStats

CACHE_TYPES = {"f32": np.float32, "f16": np.float16, "q8": np.int8}  # type -> stored dtype
SCALE_DTYPE = np.float32  # q8: one scale per head per token
Q8_MAX = 127.0
MIN_RESIDENT = 2 * BLOCK  # fewest positions a spilling global layer keeps in DRAM
HIDDEN = 1 << 62  # position of a ring slot whose entry was spilled: after every query


def check_cache_type(cache_type: str) -> str:
    if not isinstance(cache_type, str) or cache_type not in CACHE_TYPES:
        raise FlashInferError(f"unknown KV cache type {cache_type!r} "
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
                 window: int | None, spill_layer: int | None = None):
        dtype = CACHE_TYPES[cache_type]
        # a spilling ring is written to the spill file straight from its pages (O_DIRECT)
        empty = np.empty if spill_layer is None else _empty_aligned
        self.window = window
        self.spill_layer = spill_layer  # this layer's index in the spill file, if it spills
        self.spilled = 0  # blocks written to the spill file (positions 0..spilled * BLOCK)
        self.keys = empty((kv_heads, slots, head_dim), dtype)
        self.values = empty((kv_heads, slots, head_dim), dtype)
        quantized = cache_type == "q8"
        self.key_scales = empty((kv_heads, slots), SCALE_DTYPE) if quantized else None
        self.value_scales = empty((kv_heads, slots), SCALE_DTYPE) if quantized else None
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


def _empty_aligned(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return aligned_buffer(nbytes)[:nbytes].view(dtype).reshape(shape)


@dataclass
class SpilledEntries:
    """What a spilled global layer's queries attend to: `resident`, its ring in place, and
    blocks 0..blocks of the layer in the spill file."""

    resident: KVEntries
    spill: SpillFile
    layer: int  # the layer's index in the spill file
    blocks: int

    def parts(self) -> Iterator[KVEntries]:
        """The ring, then the spilled blocks a chunk at a time (the first chunk's reads are
        in flight while the ring is used; each entry is valid until the next is asked for)."""
        chunks = self.spill.chunks(self.layer, self.blocks)
        yield self.resident
        for arrays, first, count in chunks:
            keys, values, *scales = arrays
            positions = np.arange(first * BLOCK, (first + count) * BLOCK, dtype=np.int64)
            yield KVEntries(keys, values, *(scales or (None, None)), positions, len(positions))


def _concat(old: KVEntries, new_k: tuple, new_v: tuple, positions: np.ndarray) -> KVEntries:
    def cat(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else np.concatenate([a, b], axis=1)
    return KVEntries(cat(old.keys, new_k[0]), cat(old.values, new_v[0]),
                     cat(old.key_scales, new_k[1]), cat(old.value_scales, new_v[1]),
                     np.concatenate([old.positions, positions]), old.n + len(positions))


class KVCache:
    """Every layer's keys and values for a context of `max_tokens`. With `resident_tokens`
    (a multiple of BLOCK, >= MIN_RESIDENT) below it, global layers keep that many positions
    in DRAM and spill older ones to a file in `spill_dir` (see the module)."""

    def __init__(self, config: ModelConfig, max_tokens: int, cache_type: str = "f16",
                 resident_tokens: int | None = None, spill_dir: Path | None = None):
        self.max_tokens = max_tokens
        self.length = 0  # tokens stored (the position of the next token)
        self.cache_type = check_cache_type(cache_type)
        resident = spill_resident(config, max_tokens, resident_tokens)
        self.spill: SpillFile | None = None
        if resident is not None:
            if spill_dir is None:
                raise FlashInferError("a spilling KV cache needs a directory for its file")
            self.spill = SpillFile(spill_dir, config.n_kv_heads,
                                   _spilled_blocks(max_tokens, resident),
                                   *_spilled_arrays(config, cache_type))
        spill_index = iter(range(config.n_layers))
        self.layers = [
            _LayerCache(slots, config.n_kv_heads, config.head_dim, cache_type, window,
                        None if resident is None or window else next(spill_index))
            for slots, window in _layer_slots(config, max_tokens, resident)]
        self.resident_tokens = resident  # positions a global layer keeps (None: all)

    @staticmethod
    def planned_nbytes(config: ModelConfig, max_tokens: int, cache_type: str = "f16",
                       resident_tokens: int | None = None) -> int:
        """What the cache holds once full (the planner reserves this): every ring, and the
        spill file's staged chunks when global layers spill."""
        per_slot = 2 * config.n_kv_heads * (
            config.head_dim * np.dtype(CACHE_TYPES[check_cache_type(cache_type)]).itemsize
            + (np.dtype(SCALE_DTYPE).itemsize if cache_type == "q8" else 0))
        resident = spill_resident(config, max_tokens, resident_tokens)
        rings = per_slot * sum(slots for slots, _ in _layer_slots(config, max_tokens, resident))
        if resident is None:
            return rings
        return rings + SpillFile.staging_nbytes(config.n_kv_heads,
                                                _spilled_blocks(max_tokens, resident),
                                                *_spilled_arrays(config, cache_type))

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
        if layer_cache.spill_layer is not None:
            return self._store_spilling(layer_cache, new_k, new_v, positions)
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

    def _store_spilling(self, layer: _LayerCache, new_k: tuple, new_v: tuple,
                        positions: np.ndarray) -> KVEntries | SpilledEntries:
        """A spilling global layer: first write the blocks whose slots the new positions take
        to the spill file (hiding their slots), then store the new positions in the ring."""
        ring = len(layer.positions)
        end = int(positions[-1]) + 1
        if len(positions) > ring - BLOCK + 1:  # the planner's prompt batches never are
            raise ValueError(f"{len(positions)} tokens at once overflow a {ring}-slot ring")
        while layer.spilled * BLOCK < end - ring:
            first = layer.spilled * BLOCK % ring
            held = slice(first, first + BLOCK)
            self.spill.write(layer.spill_layer, layer.spilled,
                             [a[:, held] for a in layer.arrays()])
            layer.positions[held] = HIDDEN
            layer.spilled += 1
        start = int(positions[0]) % ring
        slots = slice(start, start + 1) if len(positions) == 1 else positions % ring
        layer.write(slots, new_k, new_v, positions)
        resident = layer.view(min(end, ring))
        if not layer.spilled:
            return resident
        return SpilledEntries(resident, self.spill, layer.spill_layer, layer.spilled)

    @property
    def spill_stats(self) -> IOStats:
        """What reading the spill file back cost (zeros when nothing spills)."""
        return IOStats() if self.spill is None else self.spill.stats

    def close(self) -> None:
        """Close the spill file now rather than when the cache is collected."""
        if self.spill is not None:
            self.spill.close()

    def advance(self, n_new: int) -> None:
        self.length += n_new

    def nbytes(self) -> int:
        """Bytes allocated (committed by the OS as tokens are written)."""
        staged = 0 if self.spill is None else self.spill.staging_bytes
        return staged + sum(a.nbytes for layer in self.layers for a in layer.arrays())

    def used_nbytes(self) -> int:
        """Bytes of the slots written so far."""
        return sum(a.nbytes // len(layer.positions) * min(self.length, len(layer.positions))
                   for layer in self.layers for a in layer.arrays())


def _tail(stored: tuple, kept: slice) -> tuple:
    return tuple(None if a is None else a[:, kept] for a in stored)


def _layer_slots(config: ModelConfig, max_tokens: int,
                 resident: int | None = None) -> list[tuple[int, int | None]]:
    """(slots, window or None) of each layer for a `max_tokens` context, global layers
    holding `resident` positions when they spill."""
    out = []
    for i in range(config.n_layers):
        if config.is_local_layer(i):
            out.append((min(config.sliding_window, max_tokens), config.sliding_window))
        else:
            out.append((max_tokens if resident is None else resident, None))
    return out


def _spilled_blocks(max_tokens: int, resident: int) -> int:
    """Blocks a global layer spills at most: those before its last `resident` positions."""
    return -(-(max_tokens - resident) // BLOCK)


def _global_layers(config: ModelConfig) -> int:
    return sum(not config.is_local_layer(i) for i in range(config.n_layers))


def spill_resident(config: ModelConfig, max_tokens: int,
                   resident_tokens: int | None) -> int | None:
    """The ring size of spilling global layers, or None when nothing spills (no resident
    limit, one at least the context, or no global layer)."""
    if resident_tokens is None or resident_tokens >= max_tokens or not _global_layers(config):
        return None
    if resident_tokens < MIN_RESIDENT or resident_tokens % BLOCK:
        raise FlashInferError(f"resident KV positions must be a multiple of {BLOCK} and at "
                              f"least {MIN_RESIDENT}, got {resident_tokens}")
    return resident_tokens


def _spilled_arrays(config: ModelConfig,
                    cache_type: str) -> tuple[list[np.dtype], list[tuple[int, ...]]]:
    """(dtypes, shape of one position) of the arrays a layer spills: keys, values[, scales]."""
    dtype = np.dtype(CACHE_TYPES[cache_type])
    if cache_type != "q8":
        return [dtype, dtype], [(config.head_dim,)] * 2
    scale = np.dtype(SCALE_DTYPE)
    return [dtype, dtype, scale, scale], [(config.head_dim,), (config.head_dim,), (), ()]
