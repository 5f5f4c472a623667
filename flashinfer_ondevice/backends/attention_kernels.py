"""numba attention of a few queries over the KV cache, reading keys and values where and as
they are stored (float16, int8 + scale, float32): nothing widens the cache per token.

numba has no float16 type on CPUs, so float16 entries arrive as their uint16 bits and are
widened by LLVM's own half-precision conversion (`_f16_bits_to_f32`: one vcvtph2ps per 8
values with F16C). The three passes (scores, softmax, weighted values) split the keys into
CHUNK-entry tasks; the parallel compilation spreads them over numba's threads (long
contexts), the serial one runs them on the calling thread (short ones: a parallel region
costs more than it saves, and stalls when a core is busy with other work). `kernels`
compiles both for one cache type.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import FunctionType

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

CHUNK = 256  # cache entries per task


@intrinsic
def _f16_bits_to_f32(typingctx, bits):
    """The float16 whose bits are `bits` (uint16), as float32 (exact)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@intrinsic
def _round_to_f16(typingctx, x):
    """float32 rounded to the nearest float16 (as llama.cpp rounds probabilities)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        half = builder.fptrunc(args[0], ir.HalfType())
        return builder.fpext(half, ir.FloatType())
    return types.float32(types.float32), codegen


def widen_row(src, dst):
    """dst[:] = src as float32 (src: uint16 float16 bits, int8 or float32)."""


@overload(widen_row, jit_options={"fastmath": {"reassoc", "contract"}})
def _widen_row(src, dst):
    if src.dtype == types.uint16:
        def widen_bits(src, dst):
            for i in range(len(src)):
                dst[i] = _f16_bits_to_f32(src[i])
        return widen_bits

    def widen(src, dst):
        for i in range(len(src)):
            dst[i] = np.float32(src[i])
    return widen


def entry_scale(scales, h, j):
    """The scale of entry j of head h: scales[h, j] (q8), 1 when there are none."""


@overload(entry_scale, inline="always")
def _entry_scale(scales, h, j):
    if isinstance(scales, types.NoneType):
        return lambda scales, h, j: np.float32(1.0)
    return lambda scales, h, j: scales[h, j]


def _attend(q, keys, values, key_scales, value_scales, key_positions, n, q_positions, window,
            f16_probabilities, out, lse):
    """out (tokens, kv_heads * group * head_dim) = softmax attention of q (kv_heads, group,
    tokens, head_dim, scaled) over entries 0..n of keys/values (kv_heads, slots, head_dim)
    times their scales (kv_heads, slots; None: 1); entry j at key_positions[j], causal and
    within `window` (0: no window); lse (kv_heads, group, tokens) each row's log-sum-exp.
    A row is one query of one head (token t, group member g: row t * group + g); each task
    works on local copies (its head's queries, its chunk's accumulators) and writes once."""
    n_heads, group, n_tokens, head_dim = q.shape
    rows = n_tokens * group
    n_chunks = (n + CHUNK - 1) // CHUNK
    scores = np.empty((n_heads, rows, n), np.float32)
    for task in prange(n_heads * n_chunks):
        h, c = task // n_chunks, task % n_chunks
        queries = np.empty((rows, head_dim), np.float32)
        for t in range(n_tokens):
            for g in range(group):
                queries[t * group + g] = q[h, g, t]
        row = np.empty(head_dim, np.float32)
        for j in range(c * CHUNK, min(n, (c + 1) * CHUNK)):
            widen_row(keys[h, j], row)
            scale = entry_scale(key_scales, h, j)
            for t in range(n_tokens):
                distance = q_positions[t] - key_positions[j]
                visible = distance >= 0 and (window == 0 or distance < window)
                for g in range(group):
                    r = t * group + g
                    if visible:
                        acc = np.float32(0.0)
                        for i in range(head_dim):
                            acc += queries[r, i] * row[i]
                        scores[h, r, j] = acc * scale
                    else:
                        scores[h, r, j] = -np.inf
    for x in prange(n_heads * rows):
        h, r = x // rows, x % rows
        line = scores[h, r]
        top = line.max()
        total = np.float32(0.0)
        for j in range(n):
            e = np.exp(line[j] - top)
            line[j] = e
            total += e
        lse[h, r % group, r // group] = top + np.log(total)
        inv = np.float32(1.0) / total
        for j in range(n):
            p = line[j] * inv
            line[j] = _round_to_f16(p) if f16_probabilities else p
    partial = np.empty((n_heads, n_chunks, rows, head_dim), np.float32)
    for task in prange(n_heads * n_chunks):
        h, c = task // n_chunks, task % n_chunks
        acc = np.zeros((rows, head_dim), np.float32)
        row = np.empty(head_dim, np.float32)
        for j in range(c * CHUNK, min(n, (c + 1) * CHUNK)):
            widen_row(values[h, j], row)
            scale = entry_scale(value_scales, h, j)
            for r in range(rows):
                p = scores[h, r, j] * scale
                if p != 0.0:
                    for i in range(head_dim):
                        acc[r, i] += p * row[i]
        partial[h, c] = acc
    for h in range(n_heads):
        for t in range(n_tokens):
            for g in range(group):
                r, base = t * group + g, (h * group + g) * head_dim
                for i in range(head_dim):
                    total = np.float32(0.0)
                    for c in range(n_chunks):
                        total += partial[h, c, r, i]
                    out[t, base + i] = total


def _named(function: FunctionType, name: str) -> FunctionType:
    """A copy of `function` under another name: numba's disk cache is keyed by the name, and
    each compilation of one function must have its own entry."""
    copy = FunctionType(function.__code__, function.__globals__, name)
    copy.__qualname__ = name
    return copy


# fast-math without 'ninf'/'nnan': masked scores are -inf
_FAST = {"reassoc", "contract", "nsz", "arcp"}
_ENTRY_TYPES = {"f16": types.uint16, "q8": types.int8, "f32": types.float32}


@functools.cache
def kernels(cache_type: str) -> tuple[Callable, Callable]:
    """(serial, parallel) attention over a `cache_type` cache, compiled for it alone the first
    time it is asked for, and from numba's disk cache after that (at engine creation): a
    decode step never compiles. Every array C-contiguous (the cache's own arrays): rows of
    keys and values are read with vector loads."""
    entry = _ENTRY_TYPES[cache_type]
    scales = types.float32[:, ::1] if cache_type == "q8" else types.none
    signature = types.void(types.float32[:, :, :, ::1], entry[:, :, ::1], entry[:, :, ::1],
                           scales, scales, types.int64[::1], types.int64, types.int64[::1],
                           types.int64, types.boolean, types.float32[:, ::1],
                           types.float32[:, :, ::1])
    return tuple(
        njit(signature, cache=True, fastmath=_FAST, parallel=parallel)(
            _named(_attend, f"attend_{cache_type}{'_parallel' if parallel else ''}"))
        for parallel in (False, True))
