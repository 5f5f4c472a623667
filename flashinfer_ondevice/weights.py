"""Weights: the float32 tensors of one model, in one canonical layout whatever the source file.

Matrices are (out_features, in_features), as in PyTorch checkpoints; rope pairs are the
"rotate half" layout; norm weights multiply directly (Gemma's `1 + w` is folded in by the
loader). Loaders translate their source format into this; the forward pass only reads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np


@dataclass
class LayerWeights:
    """One transformer block. Optional fields are None where the architecture has none."""

    attn_norm: np.ndarray  # (hidden,)
    wq: np.ndarray  # (n_heads * head_dim, hidden)
    wk: np.ndarray  # (n_kv_heads * head_dim, hidden)
    wv: np.ndarray  # (n_kv_heads * head_dim, hidden)
    wo: np.ndarray  # (hidden, n_heads * head_dim)
    ffn_norm: np.ndarray  # (hidden,)
    w_gate: np.ndarray  # (ffn, hidden)
    w_up: np.ndarray  # (ffn, hidden)
    w_down: np.ndarray  # (hidden, ffn)
    bq: np.ndarray | None = None  # (n_heads * head_dim,) Qwen2
    bk: np.ndarray | None = None  # (n_kv_heads * head_dim,) Qwen2
    bv: np.ndarray | None = None  # (n_kv_heads * head_dim,) Qwen2
    q_norm: np.ndarray | None = None  # (head_dim,) Gemma 3
    k_norm: np.ndarray | None = None  # (head_dim,) Gemma 3
    post_attn_norm: np.ndarray | None = None  # (hidden,) Gemma 3
    post_ffn_norm: np.ndarray | None = None  # (hidden,) Gemma 3
    # matrix field name -> activation rounding its source kernel applies ("q8_0", "q8_k", ...);
    # absent means plain float32 activations (see quant/activations.py)
    input_formats: dict[str, str] = field(default_factory=dict)

    def nbytes(self) -> int:
        arrays = (getattr(self, f.name) for f in fields(self))
        return sum(a.nbytes for a in arrays if isinstance(a, np.ndarray))


@dataclass
class Weights:
    """The whole model."""

    embed: np.ndarray  # (vocab, hidden) input embeddings
    layers: Sequence[LayerWeights]  # a list, or blocks decoded on access (lazy GGUF load)
    final_norm: np.ndarray  # (hidden,)
    output: np.ndarray | None = None  # (vocab, hidden); None = tied to `embed`
    rope_freq_factors: np.ndarray | None = None  # (head_dim / 2,) Llama 3 style, or None
    lm_head_format: str | None = None  # activation rounding of the output projection

    def embedding(self, tokens: np.ndarray) -> np.ndarray:
        return self.embed[tokens]

    @property
    def lm_head(self) -> np.ndarray:
        return self.embed if self.output is None else self.output

    def nbytes(self) -> int:
        extra = 0 if self.output is None else self.output.nbytes
        return self.embed.nbytes + self.final_norm.nbytes + extra + sum(
            layer.nbytes() for layer in self.layers)
