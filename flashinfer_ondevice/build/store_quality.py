"""What a store costs in quality, measured at convert so that the planner can weigh it.

A few chunks of held-out calibration text (the end of the text: neither the input statistics
nor the output-layer proxy see it) run through the float32 source, a layer at a time as
convert reads the layers (a lazy GGUF stays lazy), and through the finished store. Per scored
position (the second half of each chunk, llama.cpp's perplexity protocol) we record the mean
KL divergence of the store's next-token distribution from the source's (which gives the
expected perplexity change, Quality.ppl_change), top-1 agreement, and the change in mean
negative log-likelihood of the text's own next tokens. A store with an output-layer proxy
is measured twice: every logit exact, and with the shortlist head (its extra cost, against
the exact store). The figures are estimates on calibration-like text for planning; quality
is reported on evaluation text by `run-model eval` and tools/bench_codecs.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..functional import log_softmax, rms_norm
from ..generate import prefill
from ..loader.tokenizer import Tokenizer
from ..runtime.engine import open_store_session
from ..store.quality_record import Quality, parse_quality
from ..weights import LayerWeights
from .head_proxy import Capture
from .input_stats import LayerwiseRun

QUALITY_CHUNK = 512  # tokens per chunk, BOS first; the second half is scored
QUALITY_CHUNKS = 2
MIN_QUALITY_TOKENS = 64  # a calibration text shorter than this gives no quality record
_POSITIONS = 32  # scored positions whose full distributions are held at once


def held_out_chunks(tokenizer: Tokenizer, text: str, after: int) -> list[np.ndarray]:
    """The last QUALITY_CHUNKS chunks of `text`'s tokens, none of the first `after` (which
    calibration saw); fewer or shorter chunks if the text is short, none if too short."""
    ids = tokenizer.encode(text, add_special=False)[after:]
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    step = QUALITY_CHUNK - len(bos)
    count = min(QUALITY_CHUNKS, len(ids) // step)
    if count == 0:
        return [np.array(bos + ids)] if len(ids) >= MIN_QUALITY_TOKENS else []
    tail = ids[len(ids) - count * step:]
    return [np.array(bos + tail[i:i + step]) for i in range(0, len(tail), step)]


def scored(chunk: np.ndarray) -> slice:
    """Positions of a chunk whose predictions are scored (the second half, except the last
    position, whose next token is not in the chunk)."""
    return slice(len(chunk) // 2, len(chunk) - 1)


class ReferenceRun(LayerwiseRun):
    """The float32 source's final hidden states on the held-out chunks, advanced a layer at
    a time (feed it each layer in order, as convert reads them)."""

    def layer(self, i: int, layer: LayerWeights) -> None:
        self.advance(i, layer)

    def log_probs(self, c: int, positions: slice) -> np.ndarray:
        """Log-probabilities (positions, vocab) of chunk c at `positions` (after every layer)."""
        x = rms_norm(self.hidden[c][positions], self.engine.weights.final_norm,
                     self.config.norm_eps)
        return log_softmax(self.engine.weights.lm_head.apply(x))


def _parts(chunk: np.ndarray, positions: slice):
    """(rows of the scored states, their next tokens, positions in the chunk), _POSITIONS
    at a time."""
    targets = np.asarray(chunk[positions.start + 1:positions.stop + 1])
    for start in range(0, len(targets), _POSITIONS):
        rows = slice(start, min(start + _POSITIONS, len(targets)))
        yield rows, targets[rows], slice(positions.start + rows.start,
                                         positions.start + rows.stop)


class _Tally:
    def __init__(self) -> None:
        self.tokens, self.kl, self.same, self.nll_delta = 0, 0.0, 0, 0.0

    def add(self, reference: np.ndarray, model: np.ndarray, targets: np.ndarray) -> None:
        rows = np.arange(len(targets))
        self.tokens += len(targets)
        self.kl += float(np.maximum((np.exp(reference) * (reference - model)).sum(axis=-1),
                                    0.0).sum())
        self.same += int((reference.argmax(axis=-1) == model.argmax(axis=-1)).sum())
        self.nll_delta += float((reference[rows, targets] - model[rows, targets]).sum())

    def result(self) -> Quality:
        n = max(self.tokens, 1)
        return Quality(self.tokens, self.kl / n, self.same / n, self.nll_delta / n)


def _final_states(model, chunk: np.ndarray, positions: slice) -> np.ndarray:
    """The output layer's inputs at `positions` of `chunk`, run through the store."""
    capture, head = Capture(), model.weights.lm_head
    model.weights.lm_head = capture
    try:
        prefill(model.engine, [int(t) for t in chunk], model.engine.new_cache(len(chunk)),
                all_logits=True)
    finally:
        model.weights.lm_head = head
    return np.concatenate(capture.inputs)[positions]


def measure(folder: Path, reference: ReferenceRun, shortlist: bool,
            progress: bool = False) -> dict:
    """The quality record of the store in `folder` against the source (`reference`, run
    through every layer): {"exact": ..., "shortlist": ... (vs the exact store)}. One
    session open at a time; full distributions for _POSITIONS positions at a time."""
    chunks = reference.chunks
    states = []  # the scored positions' final hidden states, per chunk
    exact, short = _Tally(), _Tally()
    bar = tqdm(total=len(chunks) * (2 if shortlist else 1), desc="measuring quality",
               unit="chunk", disable=not progress)
    model = open_store_session(folder, head="exact")
    try:
        for c, chunk in enumerate(chunks):
            positions = scored(chunk)
            states.append(_final_states(model, chunk, positions))
            for rows, targets, part in _parts(chunk, positions):
                mine = log_softmax(model.weights.lm_head.apply(states[c][rows]))
                exact.add(reference.log_probs(c, part), mine, targets)
            bar.update()
    finally:
        model.close()
    if shortlist:
        model = open_store_session(folder, head="shortlist")
        try:
            exact_head = model.weights.lm_head_rows  # every row resident (no budget)
            for c, chunk in enumerate(chunks):
                for rows, targets, _ in _parts(chunk, scored(chunk)):
                    x = states[c][rows]
                    short.add(log_softmax(exact_head.apply(x)),
                              log_softmax(model.weights.lm_head.apply(x)), targets)
                bar.update()
        finally:
            model.close()
    bar.close()
    record = {"exact": exact.result().as_record()}
    if shortlist:
        record["shortlist"] = short.result().as_record()
    parse_quality(record)  # what the reader will accept (a NaN would make the store unusable)
    return record
