"""Calibration statistics of the inputs each matrix multiplies, for codecs that fit to data.

Runs the float32 checkpoint over calibration text one layer at a time (the hidden states of
every chunk are kept, a layer is loaded once: a lazy GGUF stays lazy), recording for each
distinct matrix input its second moment E[x_j^2] and E[x x^T] (damped, as GPTQ does: a
percent of the mean diagonal added, so that least squares stays well posed with few
tokens). Inputs, by what multiplies them:

  attn_in   wq, wk, wv (the normed block input)        ffn_in    w_gate, w_up
  attn_out  wo (the attention heads' output)           ffn_hidden  w_down (act(gate) * up)
  head_in   the output layer (and the tied embedding)
The FFN's down projection is stored by columns (one per neuron, see store/format.py): all the
values of such a row multiply the same input, so its statistics weigh rows against each
other, not the values within a row (see Codec.encode_columns).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from tqdm import tqdm

from ..config import ModelConfig
from ..functional import ACTIVATIONS, rms_norm
from ..model import Transformer
from ..quant.codecs import InputStats
from ..weights import DenseMatrix, DenseWeights, LayerWeights, Matrix, Weights, dense_block

DAMPING = 0.01  # fraction of the mean diagonal added to E[x x^T]
# A tied embedding is looked up as well as multiplied: the output layer's E[x x^T] gets this
# much more of its mean diagonal, which keeps each value near its own (what a lookup needs).
# Measured on Gemma 3 270M, pal4, mean KL on two held-out chunks: weighted k-means alone
# 0.199 (chunk 1), E[x x^T] + 0.1 x mean 0.119 / 0.157, + 1.0 x mean 0.109 / 0.142.
TIED_DAMPING = 1.0
INPUT_OF = {"wq": "attn_in", "wo": "attn_out", "w_gate": "ffn_in",  # one recorder per input
            "w_down": "ffn_hidden"}
MATRIX_INPUT = {"wq": "attn_in", "wk": "attn_in", "wv": "attn_in", "wo": "attn_out",
                "w_gate": "ffn_in", "w_up": "ffn_in", "w_down": "ffn_hidden"}


class _Moments:
    """Running sum of x^T x over the tokens seen (float64)."""

    def __init__(self) -> None:
        self.sum: np.ndarray | None = None
        self.count = 0

    def add(self, x: np.ndarray) -> None:
        x64 = x.reshape(-1, x.shape[-1]).astype(np.float64)
        outer = x64.T @ x64
        self.sum = outer if self.sum is None else self.sum + outer
        self.count += len(x64)

    def stats(self) -> InputStats:
        hessian = self.sum / max(self.count, 1)
        diagonal = np.diag(hessian).copy()
        damped = hessian + DAMPING * max(float(diagonal.mean()), 1e-30) * np.eye(len(diagonal))
        return InputStats(diagonal.astype(np.float32), damped.astype(np.float32))


class _Recorder:
    """Stands in for a matrix: records its inputs, then multiplies."""

    def __init__(self, matrix: DenseMatrix, moments: _Moments):
        self.matrix, self.moments = matrix, moments
        self.rows = matrix.rows

    def apply(self, x: np.ndarray) -> np.ndarray:
        self.moments.add(x)
        return self.matrix.apply(x)


class LayerwiseRun:
    """The float32 checkpoint over chunks of tokens, a layer at a time: feed it each layer in
    order (as convert reads them; a layer is loaded once, a lazy GGUF stays lazy) and it
    moves every chunk's hidden states past that layer (`hidden`)."""

    def __init__(self, config: ModelConfig, weights: Weights, chunks: list[np.ndarray]):
        self.config = config
        self.activation = ACTIVATIONS[config.traits.activation]
        shell = Weights(weights.embed, (), weights.final_norm, weights.output,
                        weights.rope_freq_factors)
        self.engine = Transformer(config, DenseWeights(shell, self.activation),
                                  cache_type="f32")
        self.chunks = chunks
        self.hidden = [self.engine.embed(np.asarray(c)) for c in chunks]

    def advance(self, i: int, layer: LayerWeights,
                wrap: Callable[[str, DenseMatrix], Matrix] | None = None) -> None:
        """Run every chunk through layer i (`wrap`: as dense_block's)."""
        block = dense_block(layer, self.activation, wrap)
        for c, x in enumerate(self.hidden):
            cache = self.engine.new_cache(len(x))
            cache.reserve(len(x))
            self.hidden[c] = self.engine.block(i, block, x, np.arange(len(x)), cache)


class InputStatsCollector(LayerwiseRun):
    """Feed it the checkpoint's layers in order; it returns each layer's input statistics
    and moves the calibration tokens' hidden states past that layer."""

    def __init__(self, config: ModelConfig, weights: Weights, chunks: list[np.ndarray],
                 progress: bool = False):
        super().__init__(config, weights, chunks)
        self.bar = tqdm(total=config.n_layers, desc="input statistics", unit="layer",
                        disable=not progress)

    @property
    def tokens(self) -> int:
        return sum(len(c) for c in self.chunks)

    def layer(self, i: int, layer: LayerWeights) -> dict[str, InputStats]:
        """Statistics of layer i's inputs, by matrix field (see MATRIX_INPUT)."""
        moments = {name: _Moments() for name in INPUT_OF.values()}

        def wrap(field: str, matrix: DenseMatrix):
            return _Recorder(matrix, moments[INPUT_OF[field]]) if field in INPUT_OF else matrix

        self.advance(i, layer, wrap)
        self.bar.update()
        stats = {name: m.stats() for name, m in moments.items()}
        return {field: stats[name] for field, name in MATRIX_INPUT.items()}

    def head(self, final_norm: np.ndarray) -> InputStats:
        """Statistics of the output layer's input (after the last layer)."""
        self.bar.close()
        moments = _Moments()
        for x in self.hidden:
            moments.add(rms_norm(x, final_norm, self.config.norm_eps))
        return moments.stats()


def for_tied_embedding(head: InputStats) -> InputStats:
    """The output layer's input statistics as a tied embedding is fitted to (TIED_DAMPING)."""
    if head.hessian is None:
        return head
    mean = float(np.diag(head.hessian).mean())
    return InputStats(head.second_moment,
                      head.hessian + np.float32(TIED_DAMPING * mean) * np.eye(
                          len(head.hessian), dtype=np.float32))
