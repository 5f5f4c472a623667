"""The backend interface: the operations the forward pass asks for, and their numpy forms.

A backend computes from a codec's bytes (quant/codecs.py) without the caller knowing how:
one token (`matvec`, `gate_activations`, `bundle_ffn`), several tokens (`matmul`,
`bundle_ffn_matmul`), attention over the KV cache and norms. `Backend` itself is the plain
numpy form of each operation (decode a block of rows to float32, multiply); subclasses
override what they do faster (backends/cpu.py) or elsewhere (backends/mlx_backend.py).
Resident matrices and dense FFNs may be `prepare`d once at load into a backend's own form
(a packed copy it multiplies faster), which then owns their memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar, Protocol

import numpy as np

from ..functional import ACTIVATIONS, rms_norm
from ..kv_cache import KVEntries
from ..quant.codecs import Codec

DECODE_ROWS = 256  # rows decoded to float32 at a time (bounds decoding's temporary memory)
SCORE_BYTES = 8 << 20  # attention scores computed at once (bounds prefill memory at any context)
KEY_BLOCK = 4096  # cache entries widened to float32 at a time


class Prepared(Protocol):
    """A resident matrix in a backend's own form: apply(x) = x @ W.T for (tokens, cols) x."""

    nbytes: int  # memory it holds

    def apply(self, x: np.ndarray) -> np.ndarray: ...


def query_block(n_heads: int, n_tokens: int, n_keys: int) -> int:
    """Queries whose attention scores (n_heads x queries x n_keys float32) are computed at
    once: as many as SCORE_BYTES hold, at least one."""
    return max(1, min(n_tokens, SCORE_BYTES // (4 * n_heads * n_keys)))


def attention_mask(q_positions: np.ndarray, k_positions: np.ndarray,
                   window: int | None) -> np.ndarray:
    """Boolean (queries, keys): causal, and within `window` tokens for local layers."""
    distance = q_positions[:, None] - k_positions[None, :]
    allowed = distance >= 0
    if window:
        allowed &= distance < window
    return allowed


def _per_row(weights: np.ndarray) -> np.ndarray:
    """(kv_heads, group, tokens) -> (tokens, kv_heads * group, 1), to scale attention rows."""
    return weights.transpose(2, 0, 1).reshape(weights.shape[2], -1, 1)


class Backend:
    """The numpy form of every operation; a registered subclass overrides what it does better."""

    name: ClassVar[str] = "base"
    install_hint: ClassVar[str] = ""  # what to install when `installed()` is False
    device_tier: ClassVar[bool] = False  # keeps resident weights in a device form that a
    # device budget (--gpu-memory-budget) places: `device_nbytes` says their bytes

    @classmethod
    def installed(cls) -> bool:
        """Whether what this backend needs can be imported here."""
        return True

    def __init__(self, threads: int | None = None):
        self.threads = threads

    def decode(self, codec: Codec, raw: np.ndarray, cols: int) -> np.ndarray:
        """(n, row_nbytes) codec bytes -> (n, cols) float32."""
        return codec.decode(raw, cols)

    def prepares(self, codec: Codec, cols: int) -> bool:
        """Whether `prepare` keeps a matrix of this codec and width in its own form."""
        return False

    def prepares_ffn(self, codec: Codec, hidden: int, neurons: int) -> bool:
        """Whether `prepare_ffn` keeps a dense FFN of this codec and shape in its own form."""
        return False

    def takes_down_rows(self, codec: Codec) -> bool:
        """Whether `prepare_ffn` multiplies by the store's down projection by row where one
        is given (then the runtime reads it; a backend that prepares from the bundles' down
        columns says no, and nothing is read for it)."""
        return False

    def prepare(self, codec: Codec, raw: np.ndarray, cols: int,
                alone: bool = False) -> Prepared | None:
        """A resident matrix in this backend's own form, or None to compute from `raw`.
        `alone`: every product of a token will run in prepared forms (nothing is computed
        from codec bytes between them), so the backend may keep its threads waiting hot."""
        return None

    def prepare_ffn(self, codec: Codec, raw: np.ndarray, hidden: int, activation: str,
                    alone: bool = False, down_rows: np.ndarray | None = None
                    ) -> Prepared | None:
        """A resident dense FFN (row-column bundles raw) in this backend's own form, or None
        to compute from `raw`; `alone` as for `prepare`; `down_rows`: the store's copy of
        the down projection by row (hidden x neurons, the same codec), where it has one."""
        return None

    # memory beyond codec bytes: the planner asks, the runtime allocates (planner.py) -------
    @property
    def device_shares_host(self) -> bool:
        """Whether a device form lives in the process's own memory (then the DRAM budget
        counts it too)."""
        return True

    def device_nbytes(self, codec: Codec, rows: int, cols: int) -> int | None:
        """Bytes a resident rows x cols matrix takes in this backend's device form (what
        `prepare` makes, placed under a device budget), or None where it keeps none."""
        return None

    def ffn_device_nbytes(self, codec: Codec, rows: int, hidden: int) -> int | None:
        """Bytes a dense FFN of `rows` bundles takes in the device form `prepare_ffn` makes,
        or None where it keeps none."""
        return None

    def staging_nbytes(self, largest: int) -> int:
        """Memory held to compute from codec bytes (streamed or resident) when no matrix
        exceeds `largest` bytes: the backend's conversion buffers (none here)."""
        return 0

    def reserve_staging(self, largest: int) -> int:
        """Allocate what `staging_nbytes(largest)` counts; its bytes."""
        return 0

    def prepare_attention(self, cache_type: str) -> None:
        """Get attention over a `cache_type` cache ready (compile what it needs) before the
        first token."""

    # one token -------------------------------------------------------------------------
    def matvec(self, codec: Codec, raw: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
        """out[r] = decode(raw[r]) . x for every row (x: (cols,) float32)."""
        for start in range(0, len(raw), DECODE_ROWS):
            end = min(start + DECODE_ROWS, len(raw))
            out[start:end] = self.decode(codec, raw[start:end], len(x)) @ x

    def gate_activations(self, codec: Codec, raw: np.ndarray, x: np.ndarray, activation: str,
                         out: np.ndarray) -> None:
        """out[i] = act(gate_i . x), gate_i being the first row of bundle raw[i]."""
        self.matvec(codec, raw[:, :codec.row_nbytes(len(x))], x, out)
        out[:] = ACTIVATIONS[activation](out)

    def bundle_ffn(self, codec: Codec, raw: np.ndarray, rows: np.ndarray, x: np.ndarray,
                   activation: str, gate_act: np.ndarray | None, hidden_act: np.ndarray,
                   out: np.ndarray) -> None:
        """FFN output of one token over the bundles raw[rows] ([gate row | up row | down
        column]; other neurons count as zero). gate_act: act(gate . x) of each of rows when
        already known, else None; hidden_act[j] receives act(gate . x) * (up . x) of rows[j];
        out (cols,) the FFN output."""
        cols = len(x)
        rb = codec.row_nbytes(cols)
        out[:] = 0.0
        for start in range(0, len(rows), DECODE_ROWS):
            chunk = raw[rows[start:start + DECODE_ROWS]]
            if gate_act is None:
                act = ACTIVATIONS[activation](self.decode(codec, chunk[:, :rb], cols) @ x)
            else:
                act = gate_act[start:start + len(chunk)]
            h = act * (self.decode(codec, chunk[:, rb:2 * rb], cols) @ x)
            hidden_act[start:start + len(chunk)] = h
            out += h @ self.decode(codec, chunk[:, 2 * rb:], cols)

    # several tokens --------------------------------------------------------------------
    def matmul(self, codec: Codec, raw: np.ndarray, x: np.ndarray) -> np.ndarray:
        """x @ decode(raw).T for x (tokens, cols): a block of rows decoded at a time."""
        out = np.empty((len(x), len(raw)), np.float32)
        for start in range(0, len(raw), DECODE_ROWS):
            end = min(start + DECODE_ROWS, len(raw))
            out[:, start:end] = x @ self.decode(codec, raw[start:end], x.shape[1]).T
        return out

    def bundle_ffn_matmul(self, codec: Codec, raw: np.ndarray, x: np.ndarray,
                          activation: str) -> np.ndarray:
        """The dense FFN of x (tokens, hidden) over all bundles raw, a block at a time."""
        hidden = x.shape[1]
        rb, act = codec.row_nbytes(hidden), ACTIVATIONS[activation]
        out = np.zeros((len(x), hidden), np.float32)
        for start in range(0, len(raw), DECODE_ROWS):
            chunk = raw[start:start + DECODE_ROWS]
            gate = x @ self.decode(codec, chunk[:, :rb], hidden).T
            up = x @ self.decode(codec, chunk[:, rb:2 * rb], hidden).T
            out += (act(gate) * up) @ self.decode(codec, chunk[:, 2 * rb:], hidden)
        return out

    # the rest of the forward pass ------------------------------------------------------
    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        """x / sqrt(mean(x^2) + eps) * weight along the last axis."""
        return rms_norm(x, weight, eps)

    def attention_parts(self, q: np.ndarray, parts: Iterable[KVEntries],
                        q_positions: np.ndarray, window: int | None,
                        f16_probabilities: bool) -> np.ndarray:
        """`attention` over entries that come in parts (a KV cache spilled to flash): each
        part's attention weighted by its share of the softmax's denominator (from the
        parts' log-sum-exps), so only one part need be in memory at a time."""
        kv_heads, group, n_tokens, _ = q.shape
        total = total_lse = None
        for part in parts:
            lse = np.empty((kv_heads, group, n_tokens), np.float32)
            out = self.attention(q, part, q_positions, window, f16_probabilities, lse)
            if total is None:
                total, total_lse = out, lse
                continue
            top = np.maximum(total_lse, lse)
            kept, added = np.exp(total_lse - top), np.exp(lse - top)
            norm = kept + added
            rows = (n_tokens, kv_heads * group, -1)  # weights are (kv_heads, group, tokens)
            merged = total.reshape(rows) * _per_row(kept / norm) \
                + out.reshape(rows) * _per_row(added / norm)
            total, total_lse = merged.reshape(n_tokens, -1), top + np.log(norm)
        return total

    def attention(self, q: np.ndarray, kv: KVEntries, q_positions: np.ndarray,
                  window: int | None, f16_probabilities: bool,
                  lse: np.ndarray | None = None) -> np.ndarray:
        """Softmax attention of q (kv_heads, group, tokens, head_dim), already scaled, over the
        cache entries `kv`: causal, within `window` positions for local layers;
        (tokens, kv_heads * group * head_dim). `f16_probabilities` rounds the probabilities
        to float16 as llama.cpp does before multiplying the float16 values. `lse`
        (kv_heads, group, tokens), when given, receives each row's log-sum-exp of scores.

        Queries a block at a time (scores of at most SCORE_BYTES), keys and values widened to
        float32 KEY_BLOCK entries at a time: memory stays bounded at any context length."""
        kv_heads, group, n_tokens, head_dim = q.shape
        n_keys = kv.n
        block = query_block(kv_heads * group, n_tokens, n_keys)
        out = np.empty((n_tokens, kv_heads * group * head_dim), np.float32)
        for start in range(0, n_tokens, block):
            end = min(start + block, n_tokens)
            q_block = q[:, :, start:end]
            scores = np.empty((kv_heads, group, end - start, n_keys), np.float32)
            for k_start in range(0, n_keys, KEY_BLOCK):
                k_end = min(k_start + KEY_BLOCK, n_keys)
                keys_t = kv.keys_f32(k_start, k_end).transpose(0, 2, 1)[:, None]
                np.matmul(q_block, keys_t, out=scores[..., k_start:k_end])
            # softmax in place: the scores are the largest thing prefill holds
            hidden = ~attention_mask(q_positions[start:end], kv.positions[:n_keys], window)
            np.copyto(scores, np.float32(-np.inf), where=hidden)
            top = scores.max(axis=-1, keepdims=True)
            scores -= top
            np.exp(scores, out=scores)
            total = scores.sum(axis=-1, keepdims=True)
            scores /= total
            if lse is not None:
                lse[:, :, start:end] = (top + np.log(total))[..., 0]
            if f16_probabilities:
                np.copyto(scores, scores.astype(np.float16))
            acc = np.zeros((kv_heads, group, end - start, head_dim), np.float32)
            for k_start in range(0, n_keys, KEY_BLOCK):
                k_end = min(k_start + KEY_BLOCK, n_keys)
                acc += scores[..., k_start:k_end] @ kv.values_f32(k_start, k_end)[:, None]
            out[start:end] = acc.transpose(2, 0, 1, 3).reshape(end - start, -1)
        return out
