"""Mixed precision by measurement: the codec of each tensor group (embedding, attention, FFN)
that meets a size target at the least measured quality loss.

For every group and candidate codec, the group alone is encoded (fitted to the calibration
inputs exactly as convert fits it) and decoded, the float32 model runs with it on
calibration tokens that the input statistics did not use, and the mean KL divergence of its
next-token distributions from the float model's is recorded with the group's bytes. Losses of
different groups are taken as additive (they are small perturbations of different tensors),
so the best mix under a target is the cheapest-loss combination whose bytes fit, found by
trying them all (a handful of groups and codecs). The table is kept in the manifest; the
final store's quality is measured by `run-model eval` and tools/bench_codecs.py, not assumed.

A tied embedding is also tried split by token (store/vocab_tiers.py): the most probable
eighth of the vocabulary in a wide codec, the rest in a narrow one ("bpal4@32768/bpal2").
Rows are fitted one at a time, so a split embedding's rows are those of the two codecs'
round trips, and each pair costs one more forward pass, not another encoding.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from ..config import ModelConfig
from ..errors import FlashInferError
from ..functional import ACTIVATIONS, log_softmax
from ..model import Transformer
from ..quant.codecs import CODECS, TENSOR_GROUPS, Codec, InputStats
from ..weights import DenseWeights, Weights
from .input_stats import for_tied_embedding

CANDIDATES = ("int8", "int4", "bpal4", "bpal3", "bpal2")  # what a mix chooses from unless
# asked otherwise: on Gemma 3 the per-row palettes (pal4, pal3, pal2) lost to the bpal codecs
# in every group at every size, and fitting them to the embedding took most of an hour of
# `convert --bits` (docs/benchmarks.md)
# a tied embedding split by token: (hot codec, cold codec), tried where both are candidates
TIER_PAIRS = (("int8", "bpal4"), ("int8", "bpal3"), ("bpal4", "bpal3"), ("bpal4", "bpal2"),
              ("bpal3", "bpal2"))
TIER_SHARE = 8  # the hot tier: the most probable 1/TIER_SHARE of the vocabulary
GROUP_FIELDS = {"attn": ("wq", "wk", "wv", "wo"), "ffn": ("w_gate", "w_up", "w_down")}


@dataclass(frozen=True)
class Measured:
    kl: float  # mean KL(float model || model with this group encoded), nats per token
    nbytes: int  # the group's bytes in this codec


def matrix_parameters(config: ModelConfig) -> int:
    """Weights in the model's matrices (the embedding counted once when tied)."""
    h = config.hidden_size
    per_layer = (2 * h * config.n_heads * config.head_dim
                 + 2 * h * config.n_kv_heads * config.head_dim + 3 * h * config.ffn_size)
    return config.n_layers * per_layer + config.vocab_size * h * (
        1 if config.tie_embeddings else 2)


def stored_codec(c: Codec, cols: int) -> Codec:
    """The codec a tensor of `cols` columns is stored in (convert's rule: f16 where the
    chosen codec cannot take the width)."""
    return c if c.supports(cols) else CODECS["f16"]


def group_nbytes(config: ModelConfig, group: str, c: Codec) -> int:
    h, q, kv = config.hidden_size, config.n_heads * config.head_dim, \
        config.n_kv_heads * config.head_dim
    if group == "embed":
        tables = 1 if config.tie_embeddings else 2
        return tables * config.vocab_size * stored_codec(c, h).row_nbytes(h)
    if group == "attn":
        per_layer = (q + 2 * kv) * stored_codec(c, h).row_nbytes(h) + \
            h * stored_codec(c, q).row_nbytes(q)
        return config.n_layers * per_layer
    return config.n_layers * config.ffn_size * 3 * stored_codec(c, h).row_nbytes(h)


# transform(rows, stats of their inputs, by_columns): the rows as stored; by_columns: the rows
# are a matrix's columns (Codec.encode_columns)
Transform = Callable[[np.ndarray, InputStats | None, bool], np.ndarray]


def round_trip(c: Codec) -> Transform:
    """A matrix as `c` stores it: encoded (fitted to its input statistics) and decoded."""
    def transform(rows: np.ndarray, stats: InputStats | None, by_columns: bool = False
                  ) -> np.ndarray:
        stored = stored_codec(c, rows.shape[1])
        raw = stored.encode_columns(rows, stats) if by_columns else stored.encode(rows, stats)
        return stored.decode(raw, rows.shape[1])
    return transform


def with_group(weights: Weights, group: str, transform: Transform, layer_stats: list[dict],
               head_stats: InputStats) -> Weights:
    """`weights` with one group's matrices replaced by `transform(matrix, its input
    statistics)`, given the statistics convert gives each matrix."""
    variant = copy.copy(weights)
    if group == "embed":
        tied = weights.output is None
        variant.embed = transform(weights.embed,
                                  for_tied_embedding(head_stats) if tied else None)
        if not tied:
            variant.output = transform(weights.output, head_stats)
        return variant
    variant.layers = []
    for layer, stats in zip(weights.layers, layer_stats, strict=True):
        layer = copy.copy(layer)
        for field in GROUP_FIELDS[group]:
            if field == "w_down":  # stored by columns (see input_stats)
                down_t = np.ascontiguousarray(layer.w_down.T)
                layer.w_down = np.ascontiguousarray(
                    transform(down_t, stats.get(field), True).T)
            else:
                setattr(layer, field, transform(getattr(layer, field), stats.get(field)))
        variant.layers.append(layer)
    return variant


def log_probs(config: ModelConfig, weights: Weights, tokens: np.ndarray) -> np.ndarray:
    engine = Transformer(config, DenseWeights(weights, ACTIVATIONS[config.traits.activation]),
                         cache_type="f32")
    return log_softmax(engine.forward(tokens, engine.new_cache(len(tokens)), all_logits=True))


def mean_kl(reference: np.ndarray, logp: np.ndarray) -> float:
    """Mean KL(reference || logp) over positions, of log-probabilities (positions, vocab)."""
    return max(float((np.exp(reference) * (reference - logp)).sum(axis=-1).mean()), 0.0)


def tier_name(hot: str, count: int, cold: str) -> str:
    """A split embedding's name in the table and in a codec spec: "bpal4@32768/bpal2"."""
    return f"{hot}@{count}/{cold}"


def measure(config: ModelConfig, weights: Weights, layer_stats: list[dict],
            head_stats: InputStats, tokens: np.ndarray, candidates=CANDIDATES,
            hot: np.ndarray | None = None,
            progress: bool = False) -> dict[str, dict[str, Measured]]:
    """The loss and bytes of every (group, codec) on `tokens` (one chunk, BOS first), and,
    given `hot` (a tied embedding's hot tokens, build/vocab_tiers.py), of the embedding
    split by token for each of TIER_PAIRS among the candidates."""
    reference = log_probs(config, weights, tokens)
    table: dict[str, dict[str, Measured]] = {g: {} for g in TENSOR_GROUPS}
    pairs = [] if hot is None else [(h, c) for h, c in TIER_PAIRS
                                    if h in candidates and c in candidates]
    # the round-tripped rows the pairs take: each hot codec's hot rows, each cold one's others
    tier_rows = {(h, True) for h, _ in pairs} | {(c, False) for _, c in pairs}
    rows_of: dict[tuple[str, bool], np.ndarray] = {}
    cells = list(itertools.product(TENSOR_GROUPS, candidates))
    with tqdm(total=len(cells) + len(pairs), desc="measuring codecs", unit="cell",
              disable=not progress) as bar:
        for group, name in cells:
            c = CODECS[name]
            variant = with_group(weights, group, round_trip(c), layer_stats, head_stats)
            if group == "embed":
                for side in (True, False):
                    if (name, side) in tier_rows:
                        rows_of[name, side] = variant.embed[hot == side]
            table[group][name] = Measured(
                mean_kl(reference, log_probs(config, variant, tokens)),
                group_nbytes(config, group, c))
            bar.update()
        for hot_name, cold_name in pairs:
            variant = copy.copy(weights)
            variant.embed = np.empty_like(weights.embed)
            variant.embed[hot] = rows_of[hot_name, True]
            variant.embed[~hot] = rows_of[cold_name, False]
            count = int(hot.sum())
            table["embed"][tier_name(hot_name, count, cold_name)] = Measured(
                mean_kl(reference, log_probs(config, variant, tokens)),
                tiered_nbytes(config, CODECS[hot_name], count, CODECS[cold_name]))
            bar.update()
    return table


def tiered_nbytes(config: ModelConfig, hot: Codec, count: int, cold: Codec) -> int:
    """A tied embedding's bytes with `count` rows in `hot` and the rest in `cold`."""
    h = config.hidden_size
    return count * stored_codec(hot, h).row_nbytes(h) + \
        (config.vocab_size - count) * stored_codec(cold, h).row_nbytes(h)


def choose(table: dict[str, dict[str, Measured]], budget_nbytes: int) -> dict[str, str]:
    """The codec of each group with the least summed loss whose bytes fit the budget."""
    groups = list(table)
    best, best_loss = None, float("inf")
    for names in itertools.product(*(table[g] for g in groups)):
        cells = [table[g][n] for g, n in zip(groups, names, strict=True)]
        if sum(c.nbytes for c in cells) <= budget_nbytes:
            loss = sum(c.kl for c in cells)
            if loss < best_loss:
                best, best_loss = dict(zip(groups, names, strict=True)), loss
    if best is None:
        smallest = sum(min(c.nbytes for c in table[g].values()) for g in groups)
        raise FlashInferError(f"no codec mix fits {budget_nbytes / 1e6:.1f} MB of matrices; "
                              f"the smallest is {smallest / 1e6:.1f} MB")
    return best


def spec_of(choice: dict[str, str]) -> str:
    """A codec spec (quant/codecs.parse_codec_spec) for a choice: the FFN's codec first."""
    base = choice["ffn"]
    return ",".join([base, *(f"{g}={n}" for g, n in choice.items() if n != base)])
