"""Weights: what the forward pass reads (the interfaces), and a checkpoint's float32 tensors.

The forward pass (model.py) sees only the interfaces below: a `Matrix` it multiplies by, a
`FeedForward` it applies, a `Block` per layer and `ModelWeights` for the whole model. Three
kinds of weights implement them: the float32 reference (`DenseWeights`, from `Weights`
below), a flash store's resident and streamed weights (runtime/streamed.py), and sparse FFNs
(runtime/sparse_ffn.py). No attribute sniffing: each implementation says what it is by the
methods it has.

`Weights` and `LayerWeights` hold a checkpoint in one canonical layout whatever the source
file: matrices are (out_features, in_features), as in PyTorch checkpoints; rope pairs are the
"rotate half" layout; norm weights multiply directly (Gemma's `1 + w` is folded in by the
loader). Loaders translate their source format into them; convert encodes them into a store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Protocol

import numpy as np

from .quant.activations import ROUNDERS


class Matrix(Protocol):
    """A (rows, cols) weight matrix; apply(x) = x @ W.T for x of shape (tokens, cols)."""

    rows: int

    def apply(self, x: np.ndarray) -> np.ndarray: ...


class FeedForward(Protocol):
    """A layer's FFN, with its activation; apply(x) for x of shape (tokens, hidden)."""

    def apply(self, x: np.ndarray) -> np.ndarray: ...


@dataclass
class Block:
    """What the forward pass reads of one transformer block. Optional vectors are None
    where the architecture has none."""

    wq: Matrix | None  # None where `wqkv` holds wq, wk and wv
    wk: Matrix | None
    wv: Matrix | None
    wo: Matrix
    ffn: FeedForward
    attn_norm: np.ndarray
    ffn_norm: np.ndarray
    bq: np.ndarray | None = None
    bk: np.ndarray | None = None
    bv: np.ndarray | None = None
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None
    post_attn_norm: np.ndarray | None = None
    post_ffn_norm: np.ndarray | None = None
    wqkv: Matrix | None = None  # wq, wk and wv stacked (rows in that order): one product


class ModelWeights(Protocol):
    """The whole model as the forward pass reads it."""

    final_norm: np.ndarray
    rope_freq_factors: np.ndarray | None
    lm_head: Matrix

    def embedding(self, tokens: np.ndarray) -> np.ndarray: ...

    def blocks(self) -> Iterator[Block]:
        """The layers in order; a streamed implementation reads each when it is reached."""
        ...


@dataclass
class LayerWeights:
    """One transformer block of a checkpoint, float32. Optional fields are None where the
    architecture has none."""

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
    """A whole checkpoint, float32."""

    embed: np.ndarray  # (vocab, hidden) input embeddings
    layers: Sequence[LayerWeights]  # a list, or blocks decoded on access (lazy GGUF load)
    final_norm: np.ndarray  # (hidden,)
    output: np.ndarray | None = None  # (vocab, hidden); None = tied to `embed`
    rope_freq_factors: np.ndarray | None = None  # (head_dim / 2,) Llama 3 style, or None
    lm_head_format: str | None = None  # activation rounding of the output projection

    @property
    def lm_head(self) -> np.ndarray:
        return self.embed if self.output is None else self.output

    def nbytes(self) -> int:
        extra = 0 if self.output is None else self.output.nbytes
        return self.embed.nbytes + self.final_norm.nbytes + extra + sum(
            layer.nbytes() for layer in self.layers)


# The float32 reference implementation of the interfaces -------------------------------------
@dataclass
class DenseMatrix:
    """A float32 matrix; x is first rounded as the weight's source kernel would (if it does)."""

    w: np.ndarray
    input_format: str | None = None

    @property
    def rows(self) -> int:
        return self.w.shape[0]

    def apply(self, x: np.ndarray) -> np.ndarray:
        if self.input_format:
            x = ROUNDERS[self.input_format](x)
        return x @ self.w.T


@dataclass
class DenseFFN:
    gate: Matrix
    up: Matrix
    down: Matrix
    activation: Callable[[np.ndarray], np.ndarray]

    def apply(self, x: np.ndarray) -> np.ndarray:
        return self.down.apply(self.activation(self.gate.apply(x)) * self.up.apply(x))


class DenseWeights:
    """A checkpoint's float32 `Weights` behind the forward pass's interfaces."""

    def __init__(self, weights: Weights, activation: Callable[[np.ndarray], np.ndarray]):
        self.weights = weights
        self.activation = activation
        self.final_norm = weights.final_norm
        self.rope_freq_factors = weights.rope_freq_factors
        self.lm_head = DenseMatrix(weights.lm_head, weights.lm_head_format)

    def embedding(self, tokens: np.ndarray) -> np.ndarray:
        return self.weights.embed[tokens]

    def blocks(self) -> Iterator[Block]:
        for layer in self.weights.layers:
            yield dense_block(layer, self.activation)


def dense_block(layer: LayerWeights, activation: Callable[[np.ndarray], np.ndarray],
                wrap: Callable[[str, DenseMatrix], Matrix] | None = None) -> Block:
    """A checkpoint layer as a `Block` of float32 matrices; `wrap(field, matrix)` may stand
    in for each matrix (calibration records the inputs this way)."""
    def matrix(name: str) -> Matrix:
        dense = DenseMatrix(getattr(layer, name), layer.input_formats.get(name))
        return dense if wrap is None else wrap(name, dense)

    ffn = DenseFFN(matrix("w_gate"), matrix("w_up"), matrix("w_down"), activation)
    return Block(matrix("wq"), matrix("wk"), matrix("wv"), matrix("wo"), ffn,
                 layer.attn_norm, layer.ffn_norm, layer.bq, layer.bk, layer.bv,
                 layer.q_norm, layer.k_norm, layer.post_attn_norm, layer.post_ffn_norm)
