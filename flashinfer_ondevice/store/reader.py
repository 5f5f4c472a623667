"""Open a flash store: validate the manifest against the files before reading any weight.

Checked: format and version, codecs and the revision each was written at, every file name
(a plain name inside the store), every file's size, every tensor's shape against the config,
its byte range against its file and its alignment; with `verify`, each file's SHA-256. Any
problem is a one-line `StoreError`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path

from ..config import ModelConfig
from ..errors import FlashInferError
from ..quant.codecs import CODECS
from ..schema import expected_tensors, layer_key
from ..values import describe, integer
from . import down_rows as down_rows_record
from . import vocab_tiers
from .format import (
    ALIGN,
    FORMAT,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    REVISIONS,
    VERSIONS,
    WEIGHTS,
    unfinished,
)
from .head_proxy import expected_shapes as proxy_expected_shapes
from .head_proxy import parse_rank
from .quality_record import Quality, parse_quality
from .sparsity_record import SparsityRecord, parse_record
from .vocab_tiers import VocabTiers


class StoreError(FlashInferError):
    """A flash store is missing, corrupt, truncated or hostile."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    path: Path
    offset: int
    rows: int
    cols: int
    codec: str  # "f32" for vectors, else a codec name
    row_nbytes: int

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_nbytes


@dataclass
class Store:
    path: Path
    codec: str
    config: ModelConfig
    tensors: dict[str, TensorEntry]
    tokenizer: dict
    chat_template: str | None
    nbytes: int  # size of weights.bin
    sparsity: SparsityRecord | None = None  # calibration results, if calibrated
    # the output layer's low-rank proxy (store/head_proxy.py): BASIS and SCORES entries
    head_proxy: dict[str, TensorEntry] | None = None
    # measured at convert (store/quality_record.py): "exact" vs the source, and "shortlist"
    # (the shortlist head vs the exact store) when it has a proxy; None for older stores
    quality: dict[str, Quality] | None = None
    # each FFN's down projection by row (store/down_rows.py), by the FFN tensor's name
    down_rows: dict[str, TensorEntry] | None = None
    # the tied embedding split by token (store/vocab_tiers.py); its cold rows: tensors[COLD]
    vocab_tiers: VocabTiers | None = None



def is_store(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file() and not unfinished(path)


def corrupt(path: Path, message: str) -> StoreError:
    """The error of a store that is damaged or hostile: which store, and what is wrong."""
    return StoreError(f"corrupt store {path}: {message}")


def _fail(path: Path, message: str):
    raise corrupt(path, message)


def _config(path: Path, raw) -> ModelConfig:
    if not isinstance(raw, dict):
        _fail(path, "config is not an object")
    names = {f.name for f in fields(ModelConfig)}
    if set(raw) != names:
        _fail(path, f"config fields differ from this version's: {sorted(set(raw) ^ names)}")
    try:
        config = ModelConfig(**raw)
        config.validate()
    except (TypeError, FlashInferError) as exc:
        _fail(path, f"invalid config ({exc})")
    return config


def _row_nbytes(codec_name: str, cols: int, bundle: bool) -> int | None:
    if codec_name == "f32":
        return None if bundle else 4 * cols
    c = CODECS.get(codec_name)
    if c is None or not c.supports(cols):
        return None
    return c.row_nbytes(cols) * (3 if bundle else 1)


def _entry(path: Path, name: str, info, shape: tuple[int, int],
           sizes: dict[str, int]) -> TensorEntry:
    """A tensor record checked against its expected shape and its file."""
    if not isinstance(info, dict) or not all(isinstance(info.get(k), str)
                                             for k in ("file", "codec")):
        _fail(path, f"malformed record for tensor {name}")
    try:
        entry = TensorEntry(name, path / info["file"],
                            *(integer(info.get(k), k, 0, 1 << 50, StoreError)
                              for k in ("offset", "rows", "cols")),
                            info["codec"], integer(info.get("row_nbytes"), "row_nbytes", 1,
                                                   1 << 40, StoreError))
    except StoreError as exc:
        _fail(path, f"malformed record for tensor {name}: {exc}")
    if info["file"] not in sizes:
        _fail(path, f"tensor {name} lives in unlisted file {info['file']!r}")
    if (entry.rows, entry.cols) != shape:
        _fail(path, f"tensor {name} is {entry.rows}x{entry.cols}, the config implies "
                    f"{shape[0]}x{shape[1]}")
    if entry.row_nbytes != _row_nbytes(entry.codec, entry.cols, name.endswith(".ffn")):
        _fail(path, f"tensor {name}: codec {entry.codec!r} and row size "
                    f"{entry.row_nbytes} do not fit")
    if entry.offset < 0 or entry.offset % ALIGN or \
            entry.offset + entry.nbytes > sizes[info["file"]]:
        _fail(path, f"tensor {name} lies outside its file or is not {ALIGN}-aligned "
                    "(truncated?)")
    return entry


def _check_revisions(path: Path, recorded, entries: list[TensorEntry]) -> None:
    """Refuse a store holding a codec written at another revision than this runtime's (its
    bytes meant something else then): a one-line error that says to convert again."""
    if not isinstance(recorded, dict):
        _fail(path, f"{REVISIONS} is not an object")
    for name in sorted({entry.codec for entry in entries} - {"f32"}):
        revision = recorded.get(name, 1)
        if type(revision) is not int:
            _fail(path, f"{REVISIONS}[{name!r}] is {describe(revision)}, not a whole number")
        if revision != CODECS[name].revision:
            raise StoreError(f"store {path} holds {name} tensors of codec revision {revision}; "
                             f"this runtime reads {name} revision {CODECS[name].revision} "
                             f"(remove the store and convert the model again)")


def open_store(path: str | Path, verify: bool = False) -> Store:
    path = Path(path)
    manifest_path = path / MANIFEST
    if unfinished(path):
        raise StoreError(f"{path} is an unfinished store (a convert still writing it, or "
                         "killed while it did); convert the model again")
    if not manifest_path.is_file():
        raise StoreError(f"{path} is not a flash store (no {MANIFEST})")
    if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
        _fail(path, f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        text = manifest_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise StoreError(f"cannot read {manifest_path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        _fail(path, f"{MANIFEST} is not valid JSON ({exc})")
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        _fail(path, f"{MANIFEST} is not valid JSON ({exc})")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        _fail(path, f"{MANIFEST} is not a {FORMAT} manifest")
    version = manifest.get("version")
    if type(version) is int and version > max(VERSIONS):
        raise StoreError(f"store {path} has format version {version}, written by a newer "
                         f"flashinfer-ondevice; this runtime reads versions "
                         f"{', '.join(map(str, VERSIONS))} (upgrade, or convert the model again)")
    if type(version) is not int or version not in VERSIONS:
        raise StoreError(f"store {path} has format version {describe(version)}; this runtime "
                         f"reads versions {', '.join(map(str, VERSIONS))} (convert the model "
                         "again)")
    store_codec = manifest.get("codec")
    if not isinstance(store_codec, str) or store_codec not in CODECS:
        _fail(path, f"unknown codec {store_codec!r}")
    config = _config(path, manifest.get("config"))

    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        _fail(path, "no files listed")
    sizes: dict[str, int] = {}
    for name, info in files.items():
        if not isinstance(name, str) or Path(name).name != name or name in (".", "..") \
                or name == MANIFEST:
            _fail(path, f"file name {name!r} is not a plain name inside the store")
        file_path = path / name
        if file_path.is_symlink():  # a link could name any file on the machine
            _fail(path, f"{name} is a symbolic link (a store's files live inside it)")
        if not file_path.is_file():
            _fail(path, f"missing file {name}")
        size = file_path.stat().st_size
        listed = info.get("size") if isinstance(info, dict) else None
        if type(listed) is not int or listed != size:
            _fail(path, f"{name} has {size} bytes, the manifest says {describe(listed)}")
        sizes[name] = size

    raw_tensors = manifest.get("tensors")
    if not isinstance(raw_tensors, dict):
        _fail(path, "no tensor table")
    if config.n_layers > len(raw_tensors):  # bounds the work the layer count causes
        _fail(path, f"config has {config.n_layers} layers, the tensor table "
                    f"{len(raw_tensors)} entries")
    expected = expected_tensors(config)
    tiers = None
    if vocab_tiers.RECORD in manifest:
        if not config.tie_embeddings:
            _fail(path, f"{vocab_tiers.RECORD}: only a tied embedding is split by token")
        try:
            tiers = vocab_tiers.parse(manifest[vocab_tiers.RECORD], config.vocab_size)
        except ValueError as exc:
            _fail(path, str(exc))
        expected["embed"] = (tiers.hot_rows, config.hidden_size)
        expected[vocab_tiers.COLD] = (config.vocab_size - tiers.hot_rows, config.hidden_size)
    missing = sorted(set(expected) - set(raw_tensors))
    if missing:
        _fail(path, f"missing tensors {', '.join(missing[:4])}")
    tensors = {name: _entry(path, name, raw_tensors[name], shape, sizes)
               for name, shape in expected.items()}
    for name, entry in tensors.items():  # the runtime reads these from weights.bin, and
        # takes f32 tensors for vectors (norms, biases)
        if entry.path.name != WEIGHTS:
            _fail(path, f"tensor {name} lives in {entry.path.name}, not {WEIGHTS}")
        if entry.codec == "f32" and entry.rows != 1:
            _fail(path, f"tensor {name} is a matrix recorded as f32 (only vectors are)")
    head_proxy = None
    if "head_proxy" in manifest and tiers is not None:
        _fail(path, f"an output-layer proxy and {vocab_tiers.RECORD} together (convert writes "
                    "one or the other)")
    if "head_proxy" in manifest:
        try:
            rank = parse_rank(manifest["head_proxy"], config)
        except ValueError as exc:
            _fail(path, str(exc))
        proxy_shapes = proxy_expected_shapes(config, rank)
        if not set(proxy_shapes) <= set(raw_tensors):
            _fail(path, "output-layer proxy tensors are missing")
        head_proxy = {name: _entry(path, name, raw_tensors[name], shape, sizes)
                      for name, shape in proxy_shapes.items()}
    down_rows = None
    if "down_rows" in manifest:
        try:
            down_codec = down_rows_record.parse_codec(manifest["down_rows"],
                                                      tensors[layer_key(0, "ffn")].codec)
        except ValueError as exc:
            _fail(path, str(exc))
        shapes = down_rows_record.expected_shapes(config)
        if not set(shapes) <= set(raw_tensors):
            _fail(path, "down-projection rows are missing")
        down_rows = {}
        for i, (name, shape) in enumerate(shapes.items()):
            entry = _entry(path, name, raw_tensors[name], shape, sizes)
            if entry.codec != down_codec or entry.path.name != down_rows_record.FILE:
                _fail(path, f"tensor {name} is not {down_codec!r} rows in "
                            f"{down_rows_record.FILE}")
            down_rows[layer_key(i, "ffn")] = entry
    tokenizer = manifest.get("tokenizer")
    if not isinstance(tokenizer, dict) or tokenizer.get("kind") not in ("gguf", "hf") or \
            not isinstance(tokenizer.get("files", []), list) or \
            not all(isinstance(n, str) and n in sizes for n in tokenizer.get("files", [])):
        _fail(path, "tokenizer record is missing or names unlisted files")
    sparsity = None
    if "sparsity" in manifest:
        try:
            sparsity = parse_record(manifest["sparsity"], config, sizes)
        except ValueError as exc:
            _fail(path, str(exc))
    quality = None
    if "quality" in manifest:
        try:
            quality = parse_quality(manifest["quality"])
        except ValueError as exc:
            _fail(path, str(exc))
    if verify:
        for name, info in files.items():
            digest = hashlib.sha256()
            with open(path / name, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
            if digest.hexdigest() != info.get("sha256"):
                _fail(path, f"checksum mismatch in {name}")
    template = manifest.get("chat_template")
    if template is not None and not isinstance(template, str):
        _fail(path, "chat_template is not a string")
    _check_revisions(path, manifest.get(REVISIONS, {}),
                     [*tensors.values(), *(head_proxy or {}).values(),
                      *(down_rows or {}).values()])
    return Store(path, store_codec, config, tensors, tokenizer, template,
                 sizes.get("weights.bin", 0),
                 sparsity, head_proxy, quality, down_rows, tiers)
