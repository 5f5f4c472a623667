"""The transformer forward pass: Gemma 3 and the Llama/Qwen2 family.

Read top to bottom: embed -> blocks (attention, FFN) -> final norm -> logits. Architecture
differences come from `ModelConfig` and its `ArchTraits`; nothing here tests a model name.
Prefill runs the prompt in batches (generate.py), decode one token against the KV cache;
attention and norms run on the engine's backend (backends/), matrix products on the backend
the weights were made with.

The weights are read through the interfaces of weights.py (a float32 checkpoint, or a flash
store's resident/streamed/sparse weights): the forward pass never asks which it has.

`ggml_numerics` reproduces the roundings of llama.cpp's CPU backend that change results
measurably on GGUF models: fp16 GELU table, fp16 queries against the fp16 K cache, fp16
attention probabilities against the fp16 V cache (activation quantization for quantized
weights is carried by `DenseMatrix.input_format`). Gemma 3 amplifies rounding at the 1e-3
level into ~0.2 logits, so the llama.cpp comparison needs these; see
tests/test_gemma_vs_llamacpp.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .backends.base import KEY_BLOCK, Backend, query_block
from .config import ModelConfig
from .functional import (
    ACTIVATIONS,
    GGML_ACTIVATIONS,
    apply_rope,
    rope_inverse_frequencies,
    to_f16,
)
from .kv_cache import KVCache, SpilledEntries, check_cache_type
from .weights import Block, DenseWeights, ModelWeights, Weights

PREFILL_BATCH = 512  # prompt tokens per forward pass, unless a memory plan sets fewer


def prefill_nbytes(config: ModelConfig, batch: int, ctx: int, spill: bool = False) -> int:
    """Memory one forward pass of `batch` tokens at a context of `ctx` holds on top of the
    weights and the KV cache: the batch's activations (hidden states, q/k/v, the FFN's
    gate and up: ~2x what the numba path was measured to hold on Gemma 3 270M, since
    onnxruntime's buffers come on top) and attention's working set (a block of scores
    bounded by SCORE_BYTES, KEY_BLOCK keys widened, the mask, a window's gathered copy);
    with a `spill`ing KV cache, the attention outputs of parts being merged."""
    per_token = 4 * (8 * config.hidden_size + 3 * config.ffn_size
                     + 2 * (config.n_heads + 2 * config.n_kv_heads) * config.head_dim)
    row_scores = 4 * config.n_heads * ctx  # one query's scores over the context
    queries = query_block(config.n_heads, batch, ctx)
    keys = 2 * 4 * config.n_kv_heads * config.head_dim * min(KEY_BLOCK, ctx)
    window = config.sliding_window or 0
    gathered = 3 * 4 * config.n_kv_heads * config.head_dim * (min(window, ctx) + batch)
    merged = 3 * 4 * batch * config.n_heads * config.head_dim if spill else 0
    return batch * per_token + queries * (row_scores + ctx) + keys + gathered + merged


class Transformer:
    """Forward pass over `ModelWeights`; holds nothing that changes between calls."""

    def __init__(self, config: ModelConfig, weights: ModelWeights, ggml_numerics: bool = False,
                 cache_type: str = "f16", backend: Backend | None = None):
        self.config = config
        self.backend = backend or Backend()  # attention and norms (the weights compute
        # their own products, on the backend they were made with)
        self.cache_type = check_cache_type(cache_type)  # KV cache type (kv_cache.CACHE_TYPES)
        self.backend.prepare_attention(cache_type)  # compiles now, not at the first token
        self.weights = weights
        self.prefill_batch = PREFILL_BATCH  # prompt tokens per forward pass (the plan's)
        self.kv_resident_tokens: int | None = None  # positions a global layer's KV keeps in
        self.kv_spill_dir: Path | None = None  # DRAM (the plan's), older ones spill here
        self.traits = config.traits
        self.ggml_numerics = ggml_numerics
        factors = weights.rope_freq_factors
        self._inv_freq_global = rope_inverse_frequencies(config.head_dim, config.rope_theta,
                                                         factors)
        self._inv_freq_local = rope_inverse_frequencies(config.head_dim,
                                                        config.rope_theta_local, factors)
        self._embed_scale = np.float32(math.sqrt(config.hidden_size)
                                       if self.traits.scale_embeddings else 1.0)

    def new_cache(self, max_tokens: int) -> KVCache:
        self.backend.prepare_attention(self.cache_type)
        return KVCache(self.config, max_tokens, self.cache_type, self.kv_resident_tokens,
                       self.kv_spill_dir)

    def forward(self, tokens: np.ndarray, cache: KVCache, all_logits: bool = False,
                logits: bool = True) -> np.ndarray | None:
        """Logits (n, vocab) for `tokens` appended to `cache`: every position or just the last;
        `logits=False` only fills the cache (a prompt batch before the last)."""
        cache.reserve(len(tokens))
        positions = np.arange(cache.length, cache.length + len(tokens))
        x = self.embed(tokens)
        for i, layer in enumerate(self.weights.blocks()):
            x = self.block(i, layer, x, positions, cache)
        cache.advance(len(tokens))
        if not logits:
            return None
        if not all_logits:
            x = x[-1:]
        x = self.backend.rms_norm(x, self.weights.final_norm, self.config.norm_eps)
        return self.weights.lm_head.apply(x)

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """The first hidden states of `tokens`."""
        return self.weights.embedding(tokens) * self._embed_scale

    def block(self, i: int, layer: Block, x: np.ndarray, positions: np.ndarray,
              cache: KVCache) -> np.ndarray:
        eps, norm = self.config.norm_eps, self.backend.rms_norm
        h = self.attention(i, layer, norm(x, layer.attn_norm, eps), positions, cache)
        if self.traits.post_norms:
            h = norm(h, layer.post_attn_norm, eps)
        x = x + h
        h = layer.ffn.apply(norm(x, layer.ffn_norm, eps))
        if self.traits.post_norms:
            h = norm(h, layer.post_ffn_norm, eps)
        return x + h

    def attention(self, i: int, layer: Block, x: np.ndarray, positions: np.ndarray,
                  cache: KVCache) -> np.ndarray:
        cfg = self.config
        n_tokens = len(x)
        if layer.wqkv is not None:
            q_out, kv_out = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
            q, k, v = np.split(layer.wqkv.apply(x), [q_out, q_out + kv_out], axis=1)
        else:
            q, k, v = layer.wq.apply(x), layer.wk.apply(x), layer.wv.apply(x)
        if self.traits.qkv_bias:
            q, k, v = q + layer.bq, k + layer.bk, v + layer.bv
        q = q.reshape(n_tokens, cfg.n_heads, cfg.head_dim)
        k = k.reshape(n_tokens, cfg.n_kv_heads, cfg.head_dim)
        v = v.reshape(n_tokens, cfg.n_kv_heads, cfg.head_dim)
        if self.traits.qk_norm:
            q = self.backend.rms_norm(q, layer.q_norm, cfg.norm_eps)
            k = self.backend.rms_norm(k, layer.k_norm, cfg.norm_eps)
        local = cfg.is_local_layer(i)
        if local:
            q = apply_rope(q, positions, self._inv_freq_local)
            k = apply_rope(k, positions, self._inv_freq_local)
        else:
            scaled = positions / cfg.rope_scale
            q = apply_rope(q, scaled, self._inv_freq_global)
            k = apply_rope(k, scaled, self._inv_freq_global)
        entries = cache.store(i, k, v)

        group = cfg.n_heads // cfg.n_kv_heads
        # queries as (kv_heads, group, tokens, head_dim), scaled
        q = q.reshape(n_tokens, cfg.n_kv_heads, group, cfg.head_dim).transpose(1, 2, 0, 3)
        q = q * np.float32(cfg.softmax_scale)
        if self.ggml_numerics:
            q = to_f16(q)
        window = cfg.sliding_window if local else None
        if isinstance(entries, SpilledEntries):
            out = self.backend.attention_parts(q, entries.parts(), positions, window,
                                               self.ggml_numerics)
        else:
            out = self.backend.attention(q, entries, positions, window, self.ggml_numerics)
        return layer.wo.apply(out)


def reference_engine(config: ModelConfig, weights: Weights,
                     ggml_numerics: bool = False) -> Transformer:
    """The float32 numpy reference over a checkpoint's weights; `ggml_numerics` for GGUF
    sources (llama.cpp's roundings, see above)."""
    table = GGML_ACTIVATIONS if ggml_numerics else ACTIVATIONS
    return Transformer(config, DenseWeights(weights, table[config.traits.activation]),
                       ggml_numerics, "f16" if ggml_numerics else "f32")
