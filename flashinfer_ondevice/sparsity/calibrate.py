"""Calibrate a flash store's FFN activation sparsity on real text (CATS thresholds and LLM-in-
a-flash predictors), and record the results in the store.

1. Run the dense model over the calibration text in chunks, streaming each layer's FFN input
   x and gate pre-activation g = W_gate x to float16 np.memmap files in a temporary folder
   inside the store (never all in RAM; removed afterwards).
2. Per layer: the |act(g)| quantiles that give each target sparsity (gate-first thresholds);
   a rank-r least-squares predictor of g from x (the best rank-r map in the metric of the
   calibration inputs: whiten x by its SVD, truncate the SVD of the whitened targets); and,
   per target, the threshold on the predicted |act| that keeps `recall` of the truly active
   neurons (biased toward recall, as the paper does).
3. Write sparsity.bin and then the manifest atomically: an interrupted run leaves the store
   as it was (or without calibration), never inconsistent.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..config import ModelConfig
from ..errors import FlashInferError
from ..store.convert import write_manifest
from ..store.format import MANIFEST
from .record import (
    SPARSITY_FILE,
    LayerSparsity,
    SparsityRecord,
    parse_record,
    predictor_nbytes,
    write_predictors,
)

TARGETS = [0.05, 0.1, 0.2, 0.3, 0.5, 0.7]
RANK = 128
RECALL = 0.95
TOKENS = 4096
CHUNK = 512  # tokens per forward pass (each chunk starts a fresh context)
MIN_TOKENS = 256
DECODE_ROWS = 512
DEFAULTS = {"selector": "gate", "sparsity": 0.05, "window": 4}


def default_text() -> str:
    """The packaged calibration text (the Python tutorial; see data/NOTICE.md)."""
    return resources.files("flashinfer_ondevice.data").joinpath(
        "calibration-python-tutorial.txt").read_text(encoding="utf-8")


class _Recorder:
    """Stands in for a layer's FFN: stores x and W_gate x, then computes the dense FFN."""

    def __init__(self, bundles, inputs: np.memmap, gates: np.memmap):
        self.bundles, self.inputs, self.gates = bundles, inputs, gates
        self.filled = 0

    def apply(self, x: np.ndarray, activation: str, activation_fn) -> np.ndarray:
        b = self.bundles
        end = self.filled + len(x)
        self.inputs[self.filled:end] = x
        for start in range(0, len(b.raw), DECODE_ROWS):  # float32 gate rows, a block at a time
            gate_rows = b.codec.decode(b.raw[start:start + DECODE_ROWS, :b.row_nbytes], b.hidden)
            self.gates[self.filled:end, start:start + DECODE_ROWS] = x @ gate_rows.T
        self.filled = end
        return self.bundles.apply(x, activation, activation_fn)


def fit_layer(x: np.ndarray, g: np.ndarray, activation_fn, rank: int, recall: float,
              targets: list[float]) -> tuple[LayerSparsity, list[float]]:
    """Thresholds and predictor of one layer from samples x (n, hidden), g (n, ffn); also
    the fraction of neurons the predicted selector keeps at each target."""
    act = np.abs(activation_fn(g))
    thresholds = [float(np.quantile(act, t)) for t in targets]
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    keep = s > s[0] * 1e-6
    p, sigma, qt = np.linalg.svd(u[:, keep].T @ g, full_matrices=False)
    r = min(rank, len(sigma))
    a = np.zeros((x.shape[1], rank), np.float32)
    b = np.zeros((rank, g.shape[1]), np.float32)
    a[:, :r] = vt[keep].T @ (p[:, :r] / s[keep][:, None])
    b[:r] = sigma[:r, None] * qt[:r]
    predicted = np.abs(activation_fn((x @ a) @ b))
    predictor_thresholds, kept = [], []
    for t in thresholds:
        active = predicted[act > t]
        pt = float(max(np.quantile(active, 1 - recall), 0.0)) if len(active) else float(t)
        predictor_thresholds.append(pt)
        kept.append(float(np.mean(predicted > pt)))
    return LayerSparsity(thresholds, predictor_thresholds, a, b), kept


def calibrate(store_path: str | Path, text: str | None = None, tokens: int = TOKENS,
              rank: int = RANK, recall: float = RECALL, progress: bool = False) -> SparsityRecord:
    """Calibrate the store at `store_path` and record the results in it."""
    from ..api import load
    from ..model import ACTIVATIONS

    store_path = Path(store_path)
    model = load(store_path, selector="dense")
    config = model.config
    rank = min(rank, config.hidden_size)
    text = default_text() if text is None else text
    ids = model.tokenize(text, add_special=False)[:tokens]
    if len(ids) < MIN_TOKENS:
        raise FlashInferError(f"calibration text has {len(ids)} tokens; at least {MIN_TOKENS} "
                              "are needed")
    bos = [model.tokenizer.bos_id] if model.tokenizer.bos_id is not None else []
    chunks = [bos + ids[i:i + CHUNK - len(bos)] for i in range(0, len(ids), CHUNK - len(bos))]
    n = sum(len(c) for c in chunks)
    activation_fn = ACTIVATIONS[config.traits.activation]
    weights = model.weights
    tmp = Path(tempfile.mkdtemp(prefix=".calibration-", dir=store_path))
    try:
        recorders = []
        for i in range(config.n_layers):
            inputs = np.memmap(tmp / f"inputs-{i}.f16", np.float16, "w+",
                               shape=(n, config.hidden_size))
            gates = np.memmap(tmp / f"gates-{i}.f16", np.float16, "w+",
                              shape=(n, config.ffn_size))
            recorders.append(_Recorder(weights.resident_ffn(i), inputs, gates))
            weights.ffns[i] = recorders[-1]
        with tqdm(total=n, unit="tok", desc="calibration: dense pass", disable=not progress) \
                as bar:
            for chunk in chunks:
                model.engine.forward(np.asarray(chunk), model.engine.new_cache(len(chunk)))
                bar.update(len(chunk))
        layers, kept = [], []
        for rec in tqdm(recorders, desc="calibration: fitting", disable=not progress):
            rec.inputs.flush()
            rec.gates.flush()
            layer, layer_kept = fit_layer(np.asarray(rec.inputs, np.float32),
                                          np.asarray(rec.gates, np.float32), activation_fn,
                                          rank, recall, TARGETS)
            layers.append(layer)
            kept.append(layer_kept)
            del rec.inputs, rec.gates
    finally:
        weights.ffns.clear()
        shutil.rmtree(tmp, ignore_errors=True)
    calibration = {"tokens": n, "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
                   "predicted_kept": [float(np.mean([k[j] for k in kept]))
                                      for j in range(len(TARGETS))]}
    record = SparsityRecord(rank, list(TARGETS), float(recall), layers, dict(DEFAULTS),
                            calibration)
    write_record(store_path, record, config)
    return record


def write_record(store_path: Path, record: SparsityRecord, config: ModelConfig) -> None:
    """Replace the store's calibration: manifest without it, the new file, manifest with it.
    The record is validated as a reader will validate it before anything is written."""
    size = config.n_layers * predictor_nbytes(config, record.rank)
    try:
        parse_record(json.loads(json.dumps(record.manifest())), config, {SPARSITY_FILE: size})
    except ValueError as exc:
        raise FlashInferError(f"calibration produced an invalid record ({exc})") from None
    manifest = json.loads((store_path / MANIFEST).read_text(encoding="utf-8"))
    manifest.pop("sparsity", None)
    manifest["files"].pop(SPARSITY_FILE, None)
    write_manifest(store_path, manifest)
    partial = store_path / (SPARSITY_FILE + ".partial")
    write_predictors(partial, record.layers)
    os.replace(partial, store_path / SPARSITY_FILE)
    digest = hashlib.sha256((store_path / SPARSITY_FILE).read_bytes()).hexdigest()
    manifest["files"][SPARSITY_FILE] = {"size": (store_path / SPARSITY_FILE).stat().st_size,
                                        "sha256": digest}
    manifest["sparsity"] = record.manifest()
    write_manifest(store_path, manifest)
