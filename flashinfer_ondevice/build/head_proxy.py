"""Fitting the output layer's low-rank proxy at convert time (the format and the math it
rests on: store/head_proxy.py): run the new store over the packaged calibration text,
capture the final hidden states, fit W ~ S B in their metric, write head_proxy.bin."""


from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..config import ModelConfig
from ..quant.codecs import CODECS, GROUP
from ..runtime.engine import Session
from ..store.format import align_up
from ..store.head_proxy import BASIS, FILE, RESIDUAL, SCORES

CHUNK = 512  # tokens per calibration forward pass
_BLOCK_ROWS = 8192  # rows of W decoded to float32 at a time
_FLOP_BUDGET = 2e13  # calibration tokens x 2 x parameters: fewer tokens for bigger models
MAX_CALIBRATION_TOKENS = 2048


def proxy_rank(config: ModelConfig) -> int | None:
    """The proxy's rank: a fifth of the hidden size in whole codec groups, or none when
    that would not be much smaller than W."""
    rank = config.hidden_size // 5 // GROUP * GROUP
    return rank if rank >= GROUP else None


def calibration_tokens(parameters: int) -> int:
    return int(min(MAX_CALIBRATION_TOKENS, max(256, _FLOP_BUDGET / (2 * parameters))))


class Capture:
    """Stands in for the output layer during calibration: keeps its inputs, skips its work."""

    def __init__(self):
        self.inputs: list[np.ndarray] = []

    def apply(self, x: np.ndarray) -> np.ndarray:
        self.inputs.append(np.asarray(x, np.float32).copy())
        return np.zeros((len(x), 1), np.float32)


def final_hidden_states(model: Session, text: str, tokens: int, progress: bool) -> np.ndarray:
    """(n, hidden): the output layer's inputs at every position of `text` (first `tokens`)."""
    ids = model.tokenizer.encode(text, add_special=False)[:tokens]
    bos = [model.tokenizer.bos_id] if model.tokenizer.bos_id is not None else []
    step = CHUNK - len(bos)
    capture, head = Capture(), model.weights.lm_head
    model.weights.lm_head = capture
    try:
        for start in tqdm(range(0, len(ids), step), desc="fitting output-layer proxy",
                          unit="chunk", disable=not progress):
            chunk = bos + ids[start:start + step]
            model.engine.forward(np.asarray(chunk), model.engine.new_cache(len(chunk)),
                                 all_logits=True)
    finally:
        model.weights.lm_head = head
    return np.concatenate(capture.inputs)


def fit(decode_rows, rows: int, hidden_states: np.ndarray, rank: int
        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(basis B (rank, hidden), map M (hidden, rank), residual moment E (hidden, hidden))
    with W ~ (W M) B in the metric of `hidden_states` and E = R^T R / rows for the residual
    R = W - W M B; `decode_rows(start, end)` gives rows of W as float32."""
    h = hidden_states.astype(np.float64)
    moment = h.T @ h / len(h)
    w, q = np.linalg.eigh(moment)
    w = np.maximum(w, w.max() * 1e-6)
    half, inv_half = (q * np.sqrt(w)) @ q.T, (q / np.sqrt(w)) @ q.T
    gram = np.zeros_like(moment)
    for start in range(0, rows, _BLOCK_ROWS):
        block = decode_rows(start, min(start + _BLOCK_ROWS, rows)).astype(np.float64)
        gram += block.T @ block
    _, v = np.linalg.eigh(half @ gram @ half)
    v = v[:, ::-1][:, :rank]
    basis, to_scores = v.T @ inv_half, half @ v
    keep = np.eye(len(gram)) - to_scores @ basis  # R = W keep
    residual = keep.T @ gram @ keep / rows
    return basis.astype(np.float32), to_scores.astype(np.float32), residual.astype(np.float32)


def write(path: Path, decode_rows, rows: int, basis: np.ndarray, to_scores: np.ndarray,
          residual: np.ndarray) -> tuple[dict, dict]:
    """Write head_proxy.bin into store folder `path`: B, E, then S = W M encoded int8, each
    4096-aligned. Returns (files record, tensor records) for the manifest."""
    int8 = CODECS["int8"]
    rank = basis.shape[0]
    tensors, digest, offset = {}, hashlib.sha256(), 0
    with open(path / FILE, "wb") as f:
        def put(data: bytes) -> None:
            nonlocal offset
            f.write(data)
            digest.update(data)
            offset += len(data)

        def put_f32(name: str, matrix: np.ndarray) -> None:
            tensors[name] = {"file": FILE, "offset": offset, "rows": matrix.shape[0],
                             "cols": matrix.shape[1], "codec": "f32",
                             "row_nbytes": 4 * matrix.shape[1]}
            put(matrix.astype("<f4").tobytes())
            put(b"\0" * (align_up(offset) - offset))

        put_f32(BASIS, basis)
        put_f32(RESIDUAL, residual)
        tensors[SCORES] = {"file": FILE, "offset": offset, "rows": rows, "cols": rank,
                           "codec": "int8", "row_nbytes": int8.row_nbytes(rank)}
        for start in range(0, rows, _BLOCK_ROWS):
            block = decode_rows(start, min(start + _BLOCK_ROWS, rows))
            put(int8.encode(block @ to_scores).tobytes())
        put(b"\0" * (align_up(offset) - offset))
    return {FILE: {"size": offset, "sha256": digest.hexdigest()}}, tensors
