"""The calibration record a flash store carries: per-layer thresholds and predictors.

    manifest["sparsity"] = {file, rank, targets, recall, layers: [{thresholds,
                            predictor_thresholds}], defaults: {selector, sparsity, window},
                            calibration: {tokens, text_sha256}}
    STORE/sparsity.bin   per layer: predictor A (hidden x rank), then B (rank x ffn), float16

`thresholds[k]` is the layer's |act(gate . x)| threshold giving targets[k] sparsity on the
calibration text (gate-first selector); `predictor_thresholds[k]` the threshold on the
predictor's |act(x A B)| that keeps `recall` of those neurons (predicted selector).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import FlashInferError

SPARSITY_FILE = "sparsity.bin"
SELECTORS = ("gate", "predicted")
MAX_WINDOW = 64


@dataclass
class LayerSparsity:
    thresholds: list[float]
    predictor_thresholds: list[float]
    a: np.ndarray | None = None  # (hidden, rank) float32, loaded on demand
    b: np.ndarray | None = None  # (rank, ffn)


@dataclass
class SparsityRecord:
    rank: int
    targets: list[float]
    recall: float
    layers: list[LayerSparsity]
    defaults: dict
    calibration: dict

    def target_index(self, sparsity: float) -> int:
        for k, target in enumerate(self.targets):
            if math.isclose(target, sparsity, abs_tol=1e-9):
                return k
        raise FlashInferError(f"sparsity {sparsity} was not calibrated; this store has "
                              f"{', '.join(f'{t:g}' for t in self.targets)}")

    def manifest(self) -> dict:
        return {"file": SPARSITY_FILE, "rank": self.rank, "targets": self.targets,
                "recall": self.recall, "defaults": self.defaults,
                "calibration": self.calibration,
                "layers": [{"thresholds": la.thresholds,
                            "predictor_thresholds": la.predictor_thresholds}
                           for la in self.layers]}


def predictor_nbytes(config: ModelConfig, rank: int) -> int:
    """Bytes of one layer's predictor in sparsity.bin."""
    return 2 * rank * (config.hidden_size + config.ffn_size)


def parse_record(raw, config: ModelConfig, file_sizes: dict[str, int]) -> SparsityRecord:
    """Validate manifest["sparsity"] against the config and the file; raises ValueError."""
    if not isinstance(raw, dict) or raw.get("file") != SPARSITY_FILE:
        raise ValueError("sparsity record is malformed")
    rank, targets = raw.get("rank"), raw.get("targets")
    if not isinstance(rank, int) or not 1 <= rank <= config.hidden_size:
        raise ValueError(f"sparsity predictor rank {rank!r} is invalid")
    if not isinstance(targets, list) or not targets or \
            not all(isinstance(t, float) and 0 < t < 1 for t in targets):
        raise ValueError("sparsity targets are invalid")
    expected = config.n_layers * predictor_nbytes(config, rank)
    if file_sizes.get(SPARSITY_FILE) != expected:
        raise ValueError(f"{SPARSITY_FILE} should hold {expected} bytes for rank {rank}")
    layers_raw = raw.get("layers")
    if not isinstance(layers_raw, list) or len(layers_raw) != config.n_layers:
        raise ValueError("sparsity record has the wrong number of layers")
    layers = []
    for entry in layers_raw:
        lists = [entry.get(k) if isinstance(entry, dict) else None
                 for k in ("thresholds", "predictor_thresholds")]
        for values in lists:
            if not isinstance(values, list) or len(values) != len(targets) or not all(
                    isinstance(v, float) and math.isfinite(v) and v >= 0 for v in values):
                raise ValueError("sparsity thresholds are invalid")
        layers.append(LayerSparsity(*lists))
    defaults = raw.get("defaults")
    if not isinstance(defaults, dict) or defaults.get("selector") not in SELECTORS or \
            defaults.get("sparsity") not in targets or \
            not isinstance(defaults.get("window"), int) or \
            not 1 <= defaults["window"] <= MAX_WINDOW:
        raise ValueError("sparsity defaults are invalid")
    recall = raw.get("recall")
    if not isinstance(recall, float) or not 0 < recall <= 1:
        raise ValueError("sparsity recall is invalid")
    calibration = raw.get("calibration") if isinstance(raw.get("calibration"), dict) else {}
    return SparsityRecord(rank, targets, recall, layers, defaults, calibration)


def load_predictors(record: SparsityRecord, config: ModelConfig, store_path: Path) -> None:
    """Read every layer's predictor matrices (float32) into the record."""
    h, f, r = config.hidden_size, config.ffn_size, record.rank
    per_layer = predictor_nbytes(config, r)
    for i, layer in enumerate(record.layers):
        block = np.fromfile(store_path / SPARSITY_FILE, dtype="<f2", count=per_layer // 2,
                            offset=i * per_layer).astype(np.float32)
        if not np.isfinite(block).all():
            raise ValueError(f"{SPARSITY_FILE}: layer {i}'s predictor holds NaN or infinite "
                             "values")
        layer.a = block[:h * r].reshape(h, r)
        layer.b = block[h * r:].reshape(r, f)


def write_predictors(path: Path, layers: list[LayerSparsity]) -> None:
    with open(path, "wb") as f:
        for layer in layers:
            f.write(layer.a.astype("<f2").tobytes())
            f.write(layer.b.astype("<f2").tobytes())
