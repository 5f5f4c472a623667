"""Convert a checkpoint (GGUF or Hugging Face folder) into a flash store.

Memory: a GGUF is read lazily, one transformer block at a time (plus the embeddings), so a
7B model converts in a few GB. Atomic: everything is written into a hidden sibling folder,
PARENT/.NAME.partial-PID, marked unfinished (store/format.py: no reader opens it), which is
renamed into place only after the manifest (written last) and the data are on disk, so an
interrupted or killed convert leaves nothing that opens as a store; the next convert of the
same target removes what a killed one left. One convert per target at a time (a lock beside
it, store/lock.py). The progress bar counts bytes written."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import traceback
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..config import ModelConfig
from ..errors import FlashInferError, error_kind
from ..loader import load_checkpoint
from ..loader.tokenizer import Tokenizer
from ..quant.codecs import CODECS, Codec, InputStats, embed_tiers, parse_codec_spec
from ..schema import LAYER_MATRICES, LAYER_VECTORS, layer_key
from ..store import down_rows
from ..store import vocab_tiers as tiers_record
from ..store.format import (
    ALIGN,
    FORMAT,
    REVISIONS,
    TIERS_VERSION,
    VERSION,
    WEIGHTS,
    align_up,
    building,
    finish_building,
    sync_folder,
    write_manifest,
)
from ..store.lock import StoreBusyError, StoreWriteError, exclusive, write_error
from ..store.reader import is_store
from . import codec_choice, head_proxy, store_quality, vocab_tiers
from .calibrate import default_text
from .head_proxy import MAX_CALIBRATION_TOKENS as PROXY_TOKENS
from .head_proxy import proxy_rank
from .input_stats import InputStatsCollector, for_tied_embedding

_CHUNK_ROWS = 16384  # rows encoded at a time: bounds convert's extra memory
STATS_TOKENS = 8192  # calibration tokens whose input statistics fit data-fitted codecs
STATS_CHUNK = 512  # tokens per forward pass of the statistics (each chunk a fresh context)
MIN_STATS_TOKENS = 256


class _WeightsWriter:
    """Appends aligned tensor records to a store's file (weights.bin, down_rows.bin),
    hashing and counting as it goes."""

    def __init__(self, path: Path, bar: tqdm):
        self.name = path.name
        self.file = open(path, "wb")  # noqa: SIM115 - closed in finish()
        self.sha = hashlib.sha256()
        self.offset = 0
        self.bar = bar
        self.tensors: dict[str, dict] = {}

    def _write(self, data: bytes) -> None:
        self.file.write(data)
        self.sha.update(data)
        self.offset += len(data)
        self.bar.update(len(data))

    def put(self, name: str, rows: np.ndarray, codec_name: str, row_nbytes: int,
            cols: int, encode) -> None:
        """Write `rows` (n, cols) float32, encoded chunk by chunk with `encode`."""
        self._write(b"\0" * (align_up(self.offset) - self.offset))
        start = self.offset
        for begin in range(0, len(rows), _CHUNK_ROWS):
            encoded = encode(rows[begin:begin + _CHUNK_ROWS])
            assert encoded.shape[1] == row_nbytes
            self._write(np.ascontiguousarray(encoded).tobytes())
        self.tensors[name] = {"file": self.name, "offset": start, "rows": len(rows), "cols": cols,
                              "codec": codec_name, "row_nbytes": row_nbytes}

    def put_vector(self, name: str, values: np.ndarray) -> None:
        values = np.asarray(values, np.float32).reshape(1, -1)
        self.put(name, values, "f32", values.shape[1] * 4, values.shape[1],
                 lambda v: v.astype(np.float32).view(np.uint8))

    def put_matrix(self, name: str, matrix: np.ndarray, chosen: Codec,
                   stats: InputStats | None = None) -> None:
        c = chosen if chosen.supports(matrix.shape[1]) else CODECS["f16"]
        self.put(name, matrix, c.name, c.row_nbytes(matrix.shape[1]), matrix.shape[1],
                 lambda rows: c.encode(rows, stats))

    def finish(self) -> tuple[int, str]:
        self._write(b"\0" * (align_up(self.offset) - self.offset))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return self.offset, self.sha.hexdigest()

    def discard(self) -> None:
        """Close the file after a failure (what it could not write is dropped)."""
        with contextlib.suppress(OSError):
            self.file.close()


def _bundles(layer, c: Codec, stats: dict[str, InputStats]) -> tuple[np.ndarray, Codec]:
    """(ffn, 3 x row_nbytes): neuron i's gate row, up row and down column, encoded, each
    fitted to the statistics of what it multiplies (by matrix field; empty: none)."""
    hidden = layer.w_gate.shape[1]
    c = c if c.supports(hidden) else CODECS["f16"]
    return np.concatenate([c.encode(layer.w_gate, stats.get("w_gate")),
                           c.encode(layer.w_up, stats.get("w_up")),
                           c.encode_columns(np.ascontiguousarray(layer.w_down.T),
                                            stats.get("w_down"))], axis=1), c


def _down_rows_codec(config: ModelConfig, chosen: dict[str, Codec]) -> Codec | None:
    """The codec of the FFNs' down projections by row (store/down_rows.py), if the store
    keeps them: FFN codecs whose re-encoding by row would round twice."""
    c = chosen["ffn"]
    return c if c.down_by_row and c.supports(config.hidden_size) and \
        c.supports(config.ffn_size) else None


def _estimated_bytes(config: ModelConfig, chosen: dict[str, Codec],
                     tiers: tuple[int, Codec] | None = None) -> int:
    """Bytes the store's matrices will take, from the config (the blocks may not be loaded);
    `tiers`: the embedding's hot tokens and cold codec (store/vocab_tiers.py)."""
    h, q_out, kv_out = config.hidden_size, config.n_heads * config.head_dim, \
        config.n_kv_heads * config.head_dim
    by_row = 1 if _down_rows_codec(config, chosen) else 0
    values = {"attn": config.n_layers * (2 * h * q_out + 2 * h * kv_out),
              "ffn": config.n_layers * (3 + by_row) * h * config.ffn_size,
              "embed": config.vocab_size * h * (1 if config.tie_embeddings else 2)}
    cold = 0
    if tiers is not None:
        cold = (config.vocab_size - tiers[0]) * h
        values["embed"] -= cold
    return int(sum(n * (chosen[group].bits + 0.5) / 8 for group, n in values.items())
               + (0 if tiers is None else cold * (tiers[1].bits + 0.5) / 8))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def convert(source: str | Path, target: str | Path, codec_name: str = "int8",
            progress: bool = False, head_proxy_rank: int | None = None,
            calibration_text: str | None = None,
            calibration_tokens: int = STATS_TOKENS,
            codec_choice_record: dict | None = None) -> Path:
    """Write the flash store of `source` to `target` (which must not exist yet).
    `head_proxy_rank`: the output-layer proxy's rank (default: build/head_proxy.py's rule).
    Codecs that fit to data see the statistics of `calibration_tokens` tokens of
    `calibration_text` (default: the packaged calibration text). `codec_choice_record`: how
    `codec_name` was chosen (choose_spec), kept in the manifest.

    One convert per target at a time: it holds PARENT/.NAME.lock (store/lock.py) while it
    writes, and a second fails at once (StoreBusyError). A full disk or an unwritable folder
    is a one-line StoreWriteError; whatever fails, nothing is left behind (the hidden
    partial folder, the lock file and the folders it created go)."""
    calibration_text = default_text() if calibration_text is None else calibration_text
    source, target = Path(source), Path(target)
    try:
        chosen = parse_codec_spec(codec_name)
    except ValueError as exc:
        raise FlashInferError(str(exc)) from None
    if os.path.lexists(target):
        raise FlashInferError(f"{target} already exists; remove it or choose another -o")
    created = _make_parent(target)
    try:
        with exclusive(target.parent / f".{target.name}.lock", f"converting into {target}",
                       target):
            if os.path.lexists(target):  # made while this one waited to start
                raise FlashInferError(f"{target} already exists; remove it or choose "
                                      "another -o")
            for stale in _partial_folders(target):  # their writers are gone: the lock is free
                shutil.rmtree(stale, ignore_errors=True)
            _convert_locked(source, target, chosen, codec_name, progress, head_proxy_rank,
                            calibration_text, calibration_tokens, codec_choice_record)
    except BaseException:
        for folder in created:  # deepest first; only while empty
            try:
                os.rmdir(folder)
            except OSError:
                break
        raise
    return target


def _make_parent(target: Path) -> list[Path]:
    """Create `target`'s parent folder; the folders created, deepest first."""
    missing = []
    for folder in (target.parent, *target.parent.parents):
        if os.path.lexists(folder):
            break
        missing.append(folder)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise FlashInferError(f"cannot write {target}: a file is in the way of its "
                              "folder") from None
    except OSError as exc:
        error = write_error(exc, target, missing[-1].parent if missing else target.parent)
        if error is None:
            raise
        raise error from None
    return missing


def _partial_folders(target: Path) -> list[Path]:
    """The hidden partial folders of converts into `target` (.NAME.partial-PID), by exact
    name: never a pattern built from a user's name."""
    prefix = f".{target.name}.partial-"
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    return [target.parent / name for name in names
            if name.startswith(prefix) and name[len(prefix):].isascii()
            and name[len(prefix):].isdigit()]


def _convert_locked(source: Path, target: Path, chosen: dict[str, Codec], codec_name: str,
                    progress: bool, head_proxy_rank: int | None, calibration_text: str,
                    calibration_tokens: int, codec_choice_record: dict | None) -> None:
    """convert's work, under the target's lock: everything into a hidden partial folder
    marked unfinished (store/format.py), synced, then the marker removed and the folder
    renamed into place."""
    checkpoint = load_checkpoint(source, progress=progress, lazy=True)
    config, weights = checkpoint.config, checkpoint.weights
    tiers = embed_tiers(codec_name, config.vocab_size)
    if tiers is not None and weights.output is not None:
        raise FlashInferError(f"codec spec {codec_name!r}: only a tied embedding is split "
                              "by token")
    if tiers is not None and tiers[0] >= config.vocab_size:
        raise FlashInferError(f"codec spec {codec_name!r}: the hot tier must hold fewer than "
                              f"the vocabulary's {config.vocab_size} tokens")
    needed = _estimated_bytes(config, chosen, tiers)
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
    out = down_out = None
    down_codec = _down_rows_codec(config, chosen)
    try:
        tmp.mkdir()
        with building(tmp):
            tokenizer = _copy_tokenizer(checkpoint.source, tmp)
            store_tokenizer = _store_tokenizer(tmp, tokenizer)
            collector = None
            if tiers is not None or any(c.fits_inputs for c in chosen.values()):
                chunks, _ = calibration_chunks(store_tokenizer, calibration_text,
                                                calibration_tokens)
                collector = InputStatsCollector(config, weights, chunks, progress)
            held_out = store_quality.held_out_chunks(store_tokenizer, calibration_text,
                                                     max(calibration_tokens, PROXY_TOKENS))
            reference = store_quality.ReferenceRun(config, weights, held_out) \
                if held_out else None
            with tqdm(total=needed, unit="B", unit_scale=True,
                      desc=f"converting to {codec_name}", disable=not progress) as bar:
                out = _WeightsWriter(tmp / WEIGHTS, bar)
                if down_codec is not None:
                    down_out = _WeightsWriter(tmp / down_rows.FILE, bar)
                for i, layer in enumerate(weights.layers):
                    stats = {} if collector is None else collector.layer(i, layer)
                    if reference is not None:
                        reference.layer(i, layer)
                    for field in LAYER_MATRICES:
                        out.put_matrix(layer_key(i, field), getattr(layer, field),
                                       chosen["attn"], stats.get(field))
                    for field in LAYER_VECTORS:
                        if getattr(layer, field) is not None:
                            out.put_vector(layer_key(i, field), getattr(layer, field))
                    bundles, c = _bundles(layer, chosen["ffn"], stats)
                    out.put(layer_key(i, "ffn"), bundles, c.name, bundles.shape[1],
                            config.hidden_size, lambda rows: rows)
                    if down_out is not None:
                        down_out.put_matrix(down_rows.tensor_name(i), layer.w_down, down_codec,
                                            stats.get("w_down"))
                head_stats = None if collector is None else collector.head(weights.final_norm)
                tied = None if head_stats is None else for_tied_embedding(head_stats)
                hot = None
                if tiers is not None:
                    hot = vocab_tiers.hot_tokens(collector.hidden, weights, config.norm_eps,
                                                 tiers[0])
                    out.put_matrix("embed", weights.embed[hot], chosen["embed"], tied)
                    out.put_matrix(tiers_record.COLD, weights.embed[~hot], tiers[1], tied)
                else:
                    out.put_matrix("embed", weights.embed, chosen["embed"],
                                   tied if weights.output is None else None)
                if weights.output is not None:
                    out.put_matrix("output", weights.output, chosen["embed"], head_stats)
                out.put_vector("final_norm", weights.final_norm)
                if weights.rope_freq_factors is not None:
                    out.put_vector("rope_freqs", weights.rope_freq_factors)
                size, sha = out.finish()
                files = {WEIGHTS: {"size": size, "sha256": sha}}
                if down_out is not None:
                    size, sha = down_out.finish()
                    files[down_rows.FILE] = {"size": size, "sha256": sha}
            for name in tokenizer["files"]:
                files[name] = {"size": (tmp / name).stat().st_size,
                               "sha256": _file_sha256(tmp / name)}
            manifest = {
                "format": FORMAT, "version": VERSION, "codec": chosen["ffn"].name,
                "codecs": {group: c.name for group, c in chosen.items()}, "alignment": ALIGN,
                "config": dataclasses.asdict(config), "tokenizer": tokenizer,
                "chat_template": checkpoint.chat_template, "source": source.name,
                "files": files, "tensors": out.tensors,
                REVISIONS: {name: c.revision for name, c in CODECS.items()},
            }
            if down_out is not None:
                manifest["tensors"].update(down_out.tensors)
                manifest["down_rows"] = {"codec": down_codec.name}
            if codec_choice_record is not None:
                manifest["codec_choice"] = codec_choice_record
            if hot is not None:
                manifest[tiers_record.RECORD] = tiers_record.record(hot)
                manifest["version"] = TIERS_VERSION
            if collector is not None:
                manifest["input_statistics"] = {
                    "tokens": collector.tokens,
                    "text_sha256": hashlib.sha256(calibration_text.encode()).hexdigest()}
            write_manifest(tmp, manifest)
            rank = proxy_rank(config) if head_proxy_rank is None else head_proxy_rank
            if hot is not None:  # the proxy and the shortlist read one head tensor
                rank = None
            if rank is not None:
                _add_head_proxy(tmp, manifest, rank, progress)
                write_manifest(tmp, manifest)
            if reference is not None:
                try:
                    manifest["quality"] = store_quality.measure(tmp, reference,
                                                                rank is not None, progress)
                except ValueError as exc:  # not finite: the store runs, but is not weighed
                    print(f"warning: quality not recorded ({exc})", file=sys.stderr)
                else:
                    write_manifest(tmp, manifest)
            _sync_files(tmp)
        if os.path.lexists(target):  # a folder someone made meanwhile: never replaced
            raise FlashInferError(f"{target} already exists; remove it or choose another -o")
        finish_building(tmp)
        os.rename(tmp, target)
        sync_folder(target.parent)
    except BaseException as exc:
        for writer in (out, down_out):
            if writer is not None:
                writer.discard()
        shutil.rmtree(tmp, ignore_errors=True)
        error = write_error(exc, target, target.parent, needed) \
            if isinstance(exc, OSError) else None
        if error is None:
            raise
        raise error from None


def _sync_files(folder: Path) -> None:
    """fsync every file in `folder` and the folder itself (before it is renamed into place:
    a crash of the machine then leaves the old state or the whole store)."""
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False):
            fd = os.open(entry.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    sync_folder(folder)


def _store_tokenizer(folder: Path, record: dict) -> Tokenizer:
    from ..loader.tokenizer import GGUFTokenizer, HFTokenizer, read_json

    if record["kind"] == "hf":
        return HFTokenizer(folder, read_json(folder / "config.json") or {})
    return GGUFTokenizer(folder / "tokenizer.gguf")


def calibration_chunks(tokenizer: Tokenizer, text: str, tokens: int, extra: int = 0
                        ) -> tuple[list[np.ndarray], np.ndarray]:
    """The first `tokens` tokens of the calibration text as chunks of STATS_CHUNK tokens,
    each starting with BOS; and one chunk of up to `extra` further tokens (the statistics
    never see them)."""
    ids = tokenizer.encode(text, add_special=False)[:tokens + extra]
    if len(ids) < MIN_STATS_TOKENS + extra:
        raise FlashInferError(f"calibration text has {len(ids)} tokens; at least "
                              f"{MIN_STATS_TOKENS + extra} are needed")
    held_out = ids[len(ids) - extra:] if extra else []
    ids = ids[:len(ids) - extra]
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    step = STATS_CHUNK - len(bos)
    chunks = [np.array(bos + ids[i:i + step]) for i in range(0, len(ids), step)]
    return chunks, np.array(bos + held_out[:step])


def choose_spec(source: str | Path, matrix_nbytes: int | None = None,
                bits: float | None = None, calibration_text: str | None = None,
                progress: bool = False, candidates: tuple[str, ...] = codec_choice.CANDIDATES
                ) -> tuple[str, dict]:
    """The codec spec whose matrices fit `matrix_nbytes` (or average `bits` per weight) at
    the least measured loss among `candidates` (codec names; build/codec_choice.py), and
    the record of the measurement for the manifest. Loads the whole checkpoint in float32
    (every group is tried against the same model). A tied embedding may be chosen split by
    token (embed=HOT@N/COLD); such a store has no output-layer proxy (see
    store/vocab_tiers.py)."""
    if not candidates:
        raise FlashInferError("no candidate codecs")
    for name in candidates:
        if name not in CODECS:
            raise FlashInferError(f"unknown codec {name!r} among the candidates; known: "
                                  f"{', '.join(CODECS)}")
    text = default_text() if calibration_text is None else calibration_text
    checkpoint = load_checkpoint(source, progress=progress)
    config, weights = checkpoint.config, checkpoint.weights
    if matrix_nbytes is None:
        if bits is None:
            raise FlashInferError("give a size or bits per weight for the codec choice")
        matrix_nbytes = int(bits * codec_choice.matrix_parameters(config) / 8)
    smallest = sum(min(codec_choice.group_nbytes(config, group, CODECS[name])
                       for name in candidates)
                   for group in codec_choice.TENSOR_GROUPS)
    if smallest > matrix_nbytes:  # known from the config: refused before measuring anything
        raise FlashInferError(f"no codec mix fits {matrix_nbytes / 1e6:.1f} MB of matrices; "
                              f"the smallest is {smallest / 1e6:.1f} MB")
    chunks, held_out = calibration_chunks(checkpoint.tokenizer, text, STATS_TOKENS,
                                           STATS_CHUNK)
    collector = InputStatsCollector(config, weights, chunks, progress)
    layer_stats = [collector.layer(i, layer) for i, layer in enumerate(weights.layers)]
    head_stats = collector.head(weights.final_norm)
    hot = None  # a tied embedding is also tried split by token (store/vocab_tiers.py)
    if config.tie_embeddings and config.vocab_size >= 2 * codec_choice.TIER_SHARE:
        hot = vocab_tiers.hot_tokens(collector.hidden, weights, config.norm_eps,
                                     round(config.vocab_size / codec_choice.TIER_SHARE))
    table = codec_choice.measure(config, weights, layer_stats, head_stats, held_out,
                                 candidates=candidates, hot=hot, progress=progress)
    choice = codec_choice.choose(table, matrix_nbytes)
    record = {"target_matrix_bytes": matrix_nbytes, "tokens": len(held_out), "choice": choice,
              "measured": {g: {n: {"kl": m.kl, "bytes": m.nbytes} for n, m in row.items()}
                           for g, row in table.items()}}
    return codec_choice.spec_of(choice), record


def _add_head_proxy(folder: Path, manifest: dict, rank: int, progress: bool) -> None:
    """Fit the output layer's proxy (build/head_proxy.py) by running the new store on the
    packaged calibration text, write head_proxy.bin and record it in `manifest`."""
    from ..runtime.engine import open_store_session

    model = open_store_session(folder, head="exact")
    parameters = sum(t["rows"] * t["cols"] * (3 if name.endswith(".ffn") else 1)
                     for name, t in manifest["tensors"].items())  # a bundle holds 3 rows
    tokens = head_proxy.calibration_tokens(parameters)
    text = default_text()
    try:
        states = head_proxy.final_hidden_states(model, text, tokens, progress)
        head = model.weights.lm_head_rows
        fitted = head_proxy.fit(head.decode_rows, head.rows, states, rank)
        files, tensors = head_proxy.write(folder, head.decode_rows, head.rows, *fitted)
    finally:
        model.close()
    manifest["files"].update(files)
    manifest["tensors"].update(tensors)
    manifest["head_proxy"] = {"rank": rank, "calibration": {
        "tokens": len(states), "text_sha256": hashlib.sha256(text.encode()).hexdigest()}}


def _copy_tokenizer(source: Path, folder: Path) -> dict:
    if source.is_dir():
        names = [n for n in ("tokenizer.json", "tokenizer_config.json",
                             "generation_config.json", "config.json")
                 if (source / n).is_file()]
        for name in names:
            shutil.copyfile(source / name, folder / name)
        return {"kind": "hf", "files": names}
    from ..loader.gguf_header import read_header
    from ..loader.tokenizer import GGUFTokenizer, compact_encoder

    read_header(source).write_vocab_only(folder / "tokenizer.gguf")
    tokenizer = GGUFTokenizer(folder / "tokenizer.gguf")
    pieces = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
    offsets = np.zeros(len(pieces) + 1, np.uint32)
    offsets[1:] = np.cumsum([len(p) for p in pieces])
    (folder / "pieces.bin").write_bytes(b"".join(pieces))
    (folder / "pieces.idx").write_bytes(offsets.astype("<u4").tobytes())
    bos = tokenizer.bos_id
    # whether the compact encoder encodes as llama.cpp does, checked once here instead of
    # at every budgeted open (runtime/engine.py)
    compact = compact_encoder(folder / "tokenizer.gguf", tokenizer) is not None
    return {"kind": "gguf", "files": ["tokenizer.gguf", "pieces.bin", "pieces.idx"],
            "bos_id": bos, "eog_ids": sorted(tokenizer.eog_ids),
            "bos_text": tokenizer.special_text(bos) if bos is not None else "",
            "compact_encoder": compact}


_CHILD = ("import sys\n"
          "try:\n"
          "    from flashinfer_ondevice.build.convert import child_main\n"
          "except KeyboardInterrupt:\n"
          "    sys.exit(130)\n"
          "sys.exit(child_main(sys.argv[1:]))\n")
_KINDS = {cls.__name__: cls for cls in (StoreBusyError, StoreWriteError)}
_TAIL = 16384  # bytes of the child's output kept, to find its error line if it crashes
_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b|"
                         r"Fatal Python error|Segmentation fault|Bus error|Killed)")


def convert_in_child(source: Path, target: Path, codec_name: str, progress: bool) -> None:
    """`convert` in a child process, so that its memory (the embeddings and a block in
    float32) never counts in the caller's. Its output (the progress bar) goes to this
    stderr; its result comes back on a pipe of its own, so an error it raises comes back as
    the same class with its message, and a crash (an uncaught exception, a signal) as a
    FlashInferError naming the child's error line."""
    env = None  # the progress bar as wide as our terminal (its output passes through us)
    if progress and "TQDM_NCOLS" not in os.environ:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            columns = os.get_terminal_size(sys.stderr.fileno()).columns
            env = {**os.environ, "TQDM_NCOLS": str(max(columns - 1, 20))}
    read_fd, write_fd = os.pipe()
    try:
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(write_fd), str(source), str(target),
             codec_name, "--progress" if progress else "--quiet"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            pass_fds=(write_fd,), env=env)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    tail = bytearray()
    relay = threading.Thread(target=_relay, args=(child.stdout, tail), daemon=True)
    relay.start()
    try:
        with os.fdopen(read_fd, "rb") as results:
            raw = results.read()  # until the child exits
        child.wait()
    except BaseException:  # Ctrl-C: let the child clean up (its partial folder) first
        _stop(child)
        raise
    finally:
        relay.join(timeout=5)
    try:
        result = json.loads(raw.decode()) if raw.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        result = {}
    if not isinstance(result, dict):
        result = {}
    if child.returncode == 0 and result.get("store") == str(target):
        return
    if "error" in result:
        kind = _KINDS.get(str(result.get("kind"))) or error_kind(str(result.get("kind")))
        if kind is FlashInferError and is_store(target) and "already exists" in \
                str(result["error"]):
            return  # another process converted it meanwhile: it is there to use
        raise kind(str(result["error"]))
    raise FlashInferError(f"conversion of {source} failed ({_exit_reason(child.returncode)})"
                          + _error_line(bytes(tail)))


def _stop(child: subprocess.Popen) -> None:
    """End the child as Ctrl-C does, so that it removes what it wrote: a Ctrl-C at the
    terminal reached it too (give it a moment), else send one; kill it if it hangs."""
    for signum, grace in ((None, 2), (signal.SIGINT, 30), (signal.SIGKILL, None)):
        if signum is not None:
            with contextlib.suppress(OSError):
                child.send_signal(signum)
        try:
            child.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _relay(stream, tail: bytearray) -> None:
    """Copy the child's output to this stderr as it comes, keeping its last _TAIL bytes."""
    out = getattr(sys.stderr, "buffer", None)
    with contextlib.suppress(OSError, ValueError):
        while block := stream.read1(65536):
            tail += block
            del tail[:-_TAIL]
            try:
                if out is not None:
                    out.write(block)
                    out.flush()
                else:
                    sys.stderr.write(block.decode(errors="replace"))
                    sys.stderr.flush()
            except (OSError, ValueError):
                out = None  # our stderr is gone: keep reading, so the child never blocks
    stream.close()


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit status {code}"


def _error_line(output: bytes) -> str:
    """': ' + the child's error line (the last line of a traceback, or the like), else its
    last line of output; '' when it printed nothing."""
    lines = [line.strip() for line in re.split(r"[\r\n]+", output.decode(errors="replace"))]
    lines = [line for line in lines if line]
    for line in reversed(lines):
        if _ERROR_LINE.match(line):
            return f": {line}"
    return f": {lines[-1]}" if lines else ""


def child_main(argv: list[str]) -> int:
    """Entry of convert_in_child's process: writes one JSON object on the result pipe,
    {"store"} or {"error", "kind"}."""
    result_fd, source, target, codec_name, flag = argv
    with os.fdopen(int(result_fd), "w", encoding="utf-8") as results:
        try:
            convert(source, target, codec_name, progress=flag == "--progress")
        except FlashInferError as exc:
            result = {"error": str(exc), "kind": type(exc).__name__}
        except KeyboardInterrupt:
            return 130
        except OSError as exc:  # an unreadable source, an I/O error (a full disk or an
            # unwritable folder are StoreWriteErrors): the cause in one line
            result = {"error": f"conversion of {source} failed: {exc}",
                      "kind": "FlashInferError"}
        except Exception as exc:  # a bug: its line to the user, the traceback on request
            if os.environ.get("FLASHINFER_DEBUG"):
                traceback.print_exc()
            result = {"error": f"conversion of {source} failed: {type(exc).__name__}: {exc} "
                               "(a bug: FLASHINFER_DEBUG=1 shows where)",
                      "kind": "FlashInferError"}
        else:
            result = {"store": target}
        results.write(json.dumps(result))
    return 0 if "store" in result else 1
