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
3. Choose the defaults on held-out calibration tokens (the text's last quarter, at most
   HOLDOUT tokens, not used for fitting): each selector's targets in increasing order are
   scored against the dense model until one misses the quality bar (top-1 agreement >= 97%
   with one standard error to spare, perplexity <= +3%); the default is the sparsest
   setting that met it (gate-first on a tie), else gate-first at the lightest target.
4. Write sparsity.bin and then the manifest atomically: an interrupted run leaves the store
   as it was (or without calibration), never inconsistent.

One calibrate per store at a time: it holds STORE/.calibrate.lock (store/lock.py; a second
fails at once) and, holding it, first removes what a killed calibrate left in the store.
A full disk or a read-only store is a one-line StoreWriteError, the store left as it was.
"""

from __future__ import annotations

import contextlib
import errno
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
from ..functional import ACTIVATIONS, log_softmax
from ..runtime.engine import Session, open_store_session
from ..runtime.selectors import GateFirstSelector, PredictedSelector
from ..runtime.sparse_ffn import SparseFFN
from ..store.format import MANIFEST, stage_manifest, sync_folder
from ..store.lock import exclusive, write_error
from ..store.reader import open_store
from ..store.sparsity_record import (
    SELECTORS,
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
HOLDOUT = 512  # held-out calibration tokens that choose the defaults
TOP1_BAR, PERPLEXITY_BAR = 0.97, 0.03
WINDOW = 4  # default window of the neuron caches (LLM in a flash: 2 for Llama-2, 4-5 for OPT)
LOCK = ".calibrate.lock"  # in the store, while a calibrate writes it
SCRATCH = ".calibration-"  # prefix of the temporary folder of recorded activations


def default_text() -> str:
    """The packaged calibration text (the Python tutorial; see data/NOTICE.md)."""
    return resources.files("flashinfer_ondevice.data").joinpath(
        "calibration-python-tutorial.txt").read_text(encoding="utf-8")


class _Recorder:
    """Stands in for a layer's FFN: stores x and W_gate x, then computes the dense FFN."""

    def __init__(self, bundles, inputs: np.memmap, gates: np.memmap):
        self.bundles, self.inputs, self.gates = bundles, inputs, gates
        self.filled = 0

    def apply(self, x: np.ndarray) -> np.ndarray:
        b = self.bundles
        end = self.filled + len(x)
        self.inputs[self.filled:end] = x
        for start in range(0, len(b.raw), DECODE_ROWS):  # float32 gate rows, a block at a time
            gate_rows = b.codec.decode(b.raw[start:start + DECODE_ROWS, :b.row_nbytes], b.hidden)
            self.gates[self.filled:end, start:start + DECODE_ROWS] = x @ gate_rows.T
        self.filled = end
        return self.bundles.apply(x)


def fit_low_rank(x: np.ndarray, y: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """A (in, r), B (r, out), r = min(rank, what the samples support): the rank-r map
    minimising |x A B - y| over samples x (n, in), y (n, out) (whiten x by its SVD, truncate
    the SVD of the whitened targets)."""
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    keep = s > s[0] * 1e-6
    p, sigma, qt = np.linalg.svd(u[:, keep].T @ y, full_matrices=False)
    r = min(rank, len(sigma))
    return vt[keep].T @ (p[:, :r] / s[keep][:, None]), sigma[:r, None] * qt[:r]


def fit_layer(x: np.ndarray, g: np.ndarray, activation_fn, rank: int, recall: float,
              targets: list[float]) -> tuple[LayerSparsity, list[float]]:
    """Thresholds and predictor of one layer from samples x (n, hidden), g (n, ffn); also
    the fraction of neurons the predicted selector keeps at each target."""
    act = np.abs(activation_fn(g))
    thresholds = [float(np.quantile(act, t)) for t in targets]
    fitted_a, fitted_b = fit_low_rank(x, g, rank)
    r = fitted_b.shape[0]
    a = np.zeros((x.shape[1], rank), np.float32)  # zero-padded to the record's rank
    b = np.zeros((rank, g.shape[1]), np.float32)
    a[:, :r], b[:r] = fitted_a, fitted_b
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
    store_path = Path(store_path)
    open_store(store_path)  # not a store, or a corrupt one: its own error, before any write
    with exclusive(store_path / LOCK, f"calibrating {store_path}", store_path):
        _remove_leftovers(store_path)
        needed = [0]  # bytes the calibration writes, once known
        try:
            return _calibrate_locked(store_path, text, tokens, rank, recall, progress, needed)
        except OSError as exc:
            error = write_error(exc, store_path, store_path, needed[0] or None)
            if error is None:
                raise
            raise error from None


def _remove_leftovers(store_path: Path) -> None:
    """What a killed calibrate (or convert) left in the store: its scratch folder and its
    partial files (never listed in the manifest). Called holding the store's lock."""
    for entry in os.scandir(store_path):
        if entry.name.startswith(SCRATCH) and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        elif entry.name == SPARSITY_FILE + ".partial" or (
                entry.name.startswith(MANIFEST + ".") and entry.name.endswith(".partial")):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def _scratch(path: Path, shape: tuple[int, int]) -> np.memmap:
    """A float16 memmap at `path`, its blocks allocated now: a full disk fails here, with
    ENOSPC, rather than later as a SIGBUS in a write through the map."""
    nbytes = 2 * shape[0] * shape[1]
    with open(path, "wb") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, max(nbytes, 1))
        except AttributeError:  # no posix_fallocate (macOS): a sparse file
            f.truncate(nbytes)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            f.truncate(nbytes)
    return np.memmap(path, np.float16, "r+", shape=shape)


def _calibrate_locked(store_path: Path, text: str | None, tokens: int, rank: int,
                      recall: float, progress: bool, needed: list[int]) -> SparsityRecord:
    model = open_store_session(store_path, selector="dense")
    config = model.config
    rank = min(rank, config.hidden_size)
    text = default_text() if text is None else text
    ids = model.tokenizer.encode(text, add_special=False)[:tokens]
    if len(ids) < MIN_TOKENS:
        model.close()
        raise FlashInferError(f"calibration text has {len(ids)} tokens; at least {MIN_TOKENS} "
                              "are needed")
    held_out = min(HOLDOUT, len(ids) // 4)
    ids, holdout_ids = ids[:len(ids) - held_out], ids[len(ids) - held_out:]
    bos = [model.tokenizer.bos_id] if model.tokenizer.bos_id is not None else []
    chunks = [bos + ids[i:i + CHUNK - len(bos)] for i in range(0, len(ids), CHUNK - len(bos))]
    n = sum(len(c) for c in chunks)
    needed[0] = 2 * n * (config.hidden_size + config.ffn_size) * config.n_layers + \
        config.n_layers * predictor_nbytes(config, rank)
    activation_fn = ACTIVATIONS[config.traits.activation]
    weights = model.weights
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=SCRATCH, dir=store_path))
        recorders = []
        for i in range(config.n_layers):
            inputs = _scratch(tmp / f"inputs-{i}.f16", (n, config.hidden_size))
            gates = _scratch(tmp / f"gates-{i}.f16", (n, config.ffn_size))
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
        weights.ffns.clear()
        holdout = [bos + holdout_ids[i:i + CHUNK - len(bos)]
                   for i in range(0, len(holdout_ids) - 1, CHUNK - len(bos))]
        defaults, scored = choose_defaults(model, layers, holdout, len(bos), progress)
    finally:
        weights.ffns.clear()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        model.close()
    calibration = {"tokens": n, "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
                   "predicted_kept": [float(np.mean([k[j] for k in kept]))
                                      for j in range(len(TARGETS))],
                   "holdout_tokens": len(holdout_ids), "holdout": scored}
    record = SparsityRecord(rank, list(TARGETS), float(recall), layers, defaults, calibration)
    write_record(store_path, record, config)
    return record


def next_token_log_probs(model: Session, chunks: list[list[int]], skip: int) -> list[np.ndarray]:
    """Next-token log-probabilities at every position after the first `skip` of each chunk."""
    out = []
    for chunk in chunks:
        logits = model.engine.forward(np.asarray(chunk), model.engine.new_cache(len(chunk)),
                                      all_logits=True)[skip:-1]
        out.append(log_softmax(logits))
    return out


def meets_bar(top1: float, perplexity_change: float, tokens: int) -> bool:
    """The defaults' quality bar, with one standard error of the top-1 estimate to spare."""
    margin = (top1 * (1 - top1) / tokens) ** 0.5
    return top1 - margin >= TOP1_BAR and perplexity_change <= PERPLEXITY_BAR


def choose_defaults(model: Session, layers: list[LayerSparsity], chunks: list[list[int]], skip: int,
                    progress: bool = False) -> tuple[dict, list[dict]]:
    """Score each selector's targets (increasing, until one misses the bar) on `chunks`
    against the dense model; the defaults and every scored setting."""
    config, weights = model.config, model.weights
    activation = config.traits.activation
    targets = [np.asarray(c[skip + 1:], dtype=np.int64) for c in chunks]
    tokens = sum(len(t) for t in targets)
    dense = next_token_log_probs(model, chunks, skip)

    def nll(log_probs: list[np.ndarray]) -> float:
        return -sum(float(lp[np.arange(len(t)), t].sum())
                    for lp, t in zip(log_probs, targets, strict=True))

    dense_nll = nll(dense)
    scored = []
    with tqdm(total=len(SELECTORS) * len(TARGETS), desc="calibration: choosing defaults",
              disable=not progress) as bar:
        for selector in SELECTORS:
            for k, target in enumerate(TARGETS):
                for i, layer in enumerate(layers):
                    bundles = weights.resident_ffn(i)
                    pick = (GateFirstSelector(bundles, layer.thresholds[k])
                            if selector == "gate" else
                            PredictedSelector(layer.a, layer.b, layer.predictor_thresholds[k],
                                              ACTIVATIONS[activation]))
                    weights.ffns[i] = SparseFFN(pick, config.hidden_size, model.reader.stats,
                                                bundles)
                sparse = next_token_log_probs(model, chunks, skip)
                top1 = sum(int((a.argmax(1) == b.argmax(1)).sum())
                           for a, b in zip(sparse, dense, strict=True)) / tokens
                change = float(np.exp((nll(sparse) - dense_nll) / tokens) - 1)
                scored.append({"selector": selector, "sparsity": target, "top1": top1,
                               "perplexity_change": change,
                               "meets_bar": meets_bar(top1, change, tokens)})
                bar.update(1)
                if not scored[-1]["meets_bar"]:
                    bar.update(len(TARGETS) - 1 - k)
                    break
    weights.ffns.clear()
    met = [s for s in scored if s["meets_bar"]]
    best = max(met, key=lambda s: (s["sparsity"], s["selector"] == "gate"), default=None)
    defaults = {"selector": "gate", "sparsity": TARGETS[0], "window": WINDOW}
    if best is not None:
        defaults.update(selector=best["selector"], sparsity=best["sparsity"])
    return defaults, scored


def write_record(store_path: Path, record: SparsityRecord, config: ModelConfig) -> None:
    """Replace the store's calibration. First, while the store stays as it was, everything
    is written and synced under partial names: the new sparsity.bin, the manifest without a
    calibration (when the store has one) and the manifest with the new one. Then only
    renames, which need no space: the manifest without, the new file, the manifest with it.
    A kill at any point leaves a consistent store (the old calibration, none, or the new);
    a failure to write (a full disk) leaves the store as it was. The record is validated
    as a reader will validate it before anything is written."""
    size = config.n_layers * predictor_nbytes(config, record.rank)
    try:
        parse_record(json.loads(json.dumps(record.manifest())), config, {SPARSITY_FILE: size})
    except ValueError as exc:
        raise FlashInferError(f"calibration produced an invalid record ({exc})") from None
    manifest = json.loads((store_path / MANIFEST).read_text(encoding="utf-8"))
    without = {key: value for key, value in manifest.items() if key != "sparsity"}
    without["files"] = {name: info for name, info in manifest["files"].items()
                        if name != SPARSITY_FILE}
    partial = store_path / (SPARSITY_FILE + ".partial")
    staged = []
    try:
        write_predictors(partial, record.layers)
        digest = hashlib.sha256()
        with open(partial, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
            os.fsync(f.fileno())
        entry = {"size": partial.stat().st_size, "sha256": digest.hexdigest()}
        if without != manifest:  # the old record names the file replaced below
            staged.append(stage_manifest(store_path, without, "uncalibrated"))
        staged.append(stage_manifest(store_path, {
            **without, "files": {**without["files"], SPARSITY_FILE: entry},
            "sparsity": record.manifest()}, "calibrated"))
        renames = [(staged[0], MANIFEST)] if len(staged) == 2 else []
        for source, name in [*renames, (partial, SPARSITY_FILE), (staged[-1], MANIFEST)]:
            os.replace(source, store_path / name)
            sync_folder(store_path)
    finally:
        for path in (partial, *staged):
            with contextlib.suppress(OSError):
                os.unlink(path)
