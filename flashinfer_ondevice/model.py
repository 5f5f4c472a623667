"""The transformer forward pass (numpy reference): Gemma 3 and the Llama/Qwen2 family.

Read top to bottom: embed -> blocks (attention, FFN) -> final norm -> logits. Architecture
differences come from `ModelConfig` and its `ArchTraits`; nothing here tests a model name.
Prefill runs all prompt tokens as one batch; decode runs one token against the KV cache.

`ggml_numerics` reproduces the roundings of llama.cpp's CPU backend that change results
measurably on GGUF models: fp16 GELU table, fp16 queries against the fp16 K cache, fp16
attention probabilities against the fp16 V cache (activation quantization for quantized
weights is carried by `LayerWeights.input_formats`). Gemma 3 amplifies rounding at the 1e-3
level into ~0.2 logits, so the llama.cpp comparison needs these; see tests/test_gemma_vs_llamacpp.
"""

from __future__ import annotations

import math

import numpy as np

from .config import ModelConfig
from .kv_cache import KVCache
from .quant.activations import ROUNDERS
from .weights import LayerWeights, Weights

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    inv_rms = 1.0 / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + eps)
    return (x * inv_rms) * weight


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))


def to_f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def gelu_tanh_f16_table(x: np.ndarray) -> np.ndarray:
    """ggml's GELU_FP16: input and output rounded to fp16; identity above 10, zero below -10."""
    y = to_f16(gelu_tanh(to_f16(x)))
    return np.where(x >= 10.0, x, np.where(x <= -10.0, np.float32(0.0), y))


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


ACTIVATIONS = {"gelu_tanh": gelu_tanh, "silu": silu}
GGML_ACTIVATIONS = {"gelu_tanh": gelu_tanh_f16_table, "silu": silu}


def rope_inverse_frequencies(head_dim: int, theta: float,
                             freq_factors: np.ndarray | None = None) -> np.ndarray:
    inv = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    return inv if freq_factors is None else inv / freq_factors.astype(np.float64)


def apply_rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """Rotate-half rope on x of shape (tokens, heads, head_dim)."""
    angles = positions[:, None].astype(np.float64) * inv_freq[None, :]
    cos = np.cos(angles).astype(np.float32)[:, None, :]
    sin = np.sin(angles).astype(np.float32)[:, None, :]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention_mask(q_positions: np.ndarray, n_keys: int, window: int | None) -> np.ndarray:
    """Boolean (queries, keys): causal, and within `window` tokens for local layers."""
    k_positions = np.arange(n_keys)
    distance = q_positions[:, None] - k_positions[None, :]
    allowed = distance >= 0
    if window:
        allowed &= distance < window
    return allowed


def linear(x: np.ndarray, w, input_format: str | None = None) -> np.ndarray:
    """x @ w.T, with x first rounded as the weight's source kernel would (if it does).

    `w` is a float32 array, or a compressed matrix from a flash store (it has `apply`)."""
    if not isinstance(w, np.ndarray):
        return w.apply(x)
    if input_format:
        x = ROUNDERS[input_format](x)
    return x @ w.T


def softmax(scores: np.ndarray) -> np.ndarray:
    scores = scores - scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


class Transformer:
    """Forward pass over `Weights`; holds nothing that changes between calls."""

    def __init__(self, config: ModelConfig, weights: Weights, ggml_numerics: bool = False):
        self.config = config
        self.weights = weights
        self.traits = config.traits
        self.ggml_numerics = ggml_numerics
        table = GGML_ACTIVATIONS if ggml_numerics else ACTIVATIONS
        self.activation = table[self.traits.activation]
        factors = weights.rope_freq_factors
        self._inv_freq_global = rope_inverse_frequencies(config.head_dim, config.rope_theta,
                                                         factors)
        self._inv_freq_local = rope_inverse_frequencies(config.head_dim,
                                                        config.rope_theta_local, factors)
        self._embed_scale = np.float32(math.sqrt(config.hidden_size)
                                       if self.traits.scale_embeddings else 1.0)

    def new_cache(self, max_tokens: int) -> KVCache:
        return KVCache(self.config, max_tokens, np.float16 if self.ggml_numerics else np.float32)

    def forward(self, tokens: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Logits (n, vocab) for `tokens` appended to `cache`: every position or just the last."""
        cache.reserve(len(tokens))
        positions = np.arange(cache.length, cache.length + len(tokens))
        x = self.weights.embedding(tokens) * self._embed_scale
        for i, layer in enumerate(self.weights.layers):
            x = self.block(i, layer, x, positions, cache)
        cache.advance(len(tokens))
        if not all_logits:
            x = x[-1:]
        x = rms_norm(x, self.weights.final_norm, self.config.norm_eps)
        return linear(x, self.weights.lm_head, self.weights.lm_head_format)

    def block(self, i: int, layer: LayerWeights, x: np.ndarray, positions: np.ndarray,
              cache: KVCache) -> np.ndarray:
        eps = self.config.norm_eps
        h = self.attention(i, layer, rms_norm(x, layer.attn_norm, eps), positions, cache)
        if self.traits.post_norms:
            h = rms_norm(h, layer.post_attn_norm, eps)
        x = x + h
        h = self.feed_forward(layer, rms_norm(x, layer.ffn_norm, eps))
        if self.traits.post_norms:
            h = rms_norm(h, layer.post_ffn_norm, eps)
        return x + h

    def feed_forward(self, layer: LayerWeights, x: np.ndarray) -> np.ndarray:
        bundles = getattr(layer, "bundles", None)  # row-column bundles from a flash store
        if bundles is not None:
            return bundles.apply(x, self.traits.activation, self.activation)
        fmt = layer.input_formats.get
        gate = linear(x, layer.w_gate, fmt("w_gate"))
        up = linear(x, layer.w_up, fmt("w_up"))
        return linear(self.activation(gate) * up, layer.w_down, fmt("w_down"))

    def attention(self, i: int, layer: LayerWeights, x: np.ndarray, positions: np.ndarray,
                  cache: KVCache) -> np.ndarray:
        cfg = self.config
        n_tokens = len(x)
        fmt = layer.input_formats.get
        q = linear(x, layer.wq, fmt("wq"))
        k = linear(x, layer.wk, fmt("wk"))
        v = linear(x, layer.wv, fmt("wv"))
        if self.traits.qkv_bias:
            q, k, v = q + layer.bq, k + layer.bk, v + layer.bv
        q = q.reshape(n_tokens, cfg.n_heads, cfg.head_dim)
        k = k.reshape(n_tokens, cfg.n_kv_heads, cfg.head_dim)
        v = v.reshape(n_tokens, cfg.n_kv_heads, cfg.head_dim)
        if self.traits.qk_norm:
            q = rms_norm(q, layer.q_norm, cfg.norm_eps)
            k = rms_norm(k, layer.k_norm, cfg.norm_eps)
        local = cfg.is_local_layer(i)
        if local:
            q = apply_rope(q, positions, self._inv_freq_local)
            k = apply_rope(k, positions, self._inv_freq_local)
        else:
            scaled = positions / cfg.rope_scale
            q = apply_rope(q, scaled, self._inv_freq_global)
            k = apply_rope(k, scaled, self._inv_freq_global)
        keys, values = cache.update(i, k, v)

        group = cfg.n_heads // cfg.n_kv_heads
        # (kv_heads, group, tokens, head_dim) @ (kv_heads, 1, head_dim, keys)
        q = q.reshape(n_tokens, cfg.n_kv_heads, group, cfg.head_dim).transpose(1, 2, 0, 3)
        q = q * np.float32(cfg.softmax_scale)
        if self.ggml_numerics:
            q = to_f16(q)
        scores = q @ keys.transpose(1, 2, 0)[:, None]
        mask = attention_mask(positions, len(keys), cfg.sliding_window if local else None)
        scores = softmax(np.where(mask, scores, np.float32(-np.inf)))
        if self.ggml_numerics:
            scores = to_f16(scores)
        out = scores @ values.transpose(1, 0, 2)[:, None]  # (kv_heads, group, tokens, head_dim)
        out = out.transpose(2, 0, 1, 3).reshape(n_tokens, cfg.n_heads * cfg.head_dim)
        return linear(out, layer.wo, fmt("wo"))
