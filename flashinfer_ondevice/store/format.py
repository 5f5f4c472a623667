"""Flash store layout: names, version and the manifest records.

    STORE/manifest.json     format, version, codec, config, files (size, sha256), tensors,
                            codec_revisions (each codec's revision, quant/codecs.py)
    STORE/weights.bin       every tensor, each starting on a 4096-byte boundary
    STORE/tokenizer.gguf    (GGUF sources) the source's metadata, no tensors
    STORE/tokenizer.json    (HF sources) plus tokenizer_config.json, generation_config.json
    STORE/unfinished        only while a convert writes the folder (a hidden sibling of its
                            target, renamed into place when done): a folder holding it is
                            never opened as a store, except by the process that builds it

Tensor records: {file, offset, rows, cols, codec, row_nbytes}. A matrix is `rows` encoded rows.
FFN weights are one record per layer, "layers.{i}.ffn", whose row i is neuron i's bundle:
gate row, up row and down column, each encoded on its own, side by side (row_nbytes = 3 x one
encoded row). Vectors (norms, biases) are single f32 rows. Optional files: head_proxy.bin
(store/head_proxy.py), down_rows.bin (store/down_rows.py).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

FORMAT = "flashinfer-ondevice-store"
VERSION = 1  # what a store needing no newer feature is written as (older runtimes read it)
TIERS_VERSION = 2  # a store with vocabulary tiers (store/vocab_tiers.py): a runtime that reads
# only version 1 refuses it by its version, instead of calling the split embedding corrupt
VERSIONS = (VERSION, TIERS_VERSION)  # what this runtime reads
MANIFEST = "manifest.json"
WEIGHTS = "weights.bin"
ALIGN = 4096
MAX_MANIFEST_BYTES = 64 << 20
REVISIONS = "codec_revisions"  # {codec name: revision} of the codecs its tensors use (absent: 1)
UNFINISHED = "unfinished"  # marker of a folder a convert is still writing (or was killed in)

_building: set[str] = set()  # unfinished folders this process is writing (it may open them)


def unfinished(folder: Path) -> bool:
    """Whether `folder` is a store still being written (or whose writer was killed): it
    holds the UNFINISHED marker, and this process is not the one building it."""
    return os.path.lexists(os.path.join(folder, UNFINISHED)) and \
        os.path.realpath(folder) not in _building


@contextlib.contextmanager
def building(folder: Path) -> Iterator[None]:
    """Mark `folder` unfinished (a marker file, synced) for other processes while this one
    may open it as a store; the caller removes the marker (finish_building) when done."""
    marker = folder / UNFINISHED
    with open(marker, "w", encoding="utf-8") as f:
        f.write(f"a flash store being written by process {os.getpid()}; never opened as a "
                "store while this file is here (a convert removes it, renaming the folder "
                "into place, when the store is complete)\n")
        f.flush()
        os.fsync(f.fileno())
    key = os.path.realpath(folder)
    _building.add(key)
    try:
        yield
    finally:
        _building.discard(key)


def finish_building(folder: Path) -> None:
    """Remove `folder`'s UNFINISHED marker (its data is complete and synced)."""
    os.unlink(folder / UNFINISHED)
    sync_folder(folder)


def sync_folder(folder: Path) -> None:
    """fsync a folder, so that the names created, renamed or removed in it are durable."""
    with contextlib.suppress(OSError):  # some file systems (and Windows) cannot
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def align_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def stage_manifest(folder: Path, manifest: dict, name: str) -> Path:
    """Write `manifest` to MANIFEST.{name}.partial in `folder`, synced, for the caller to
    rename over the manifest (os.replace, then sync_folder) when the files it names are in
    place: a rename needs no space, so a full disk fails before the store changes."""
    path = folder / f"{MANIFEST}.{name}.partial"
    _write_synced(path, manifest)
    return path


def write_manifest(folder: Path, manifest: dict) -> None:
    """Replace folder's manifest atomically: a partial file, synced, then renamed over it
    (the folder synced too); on any error the old manifest stays and the partial goes."""
    tmp = folder / (MANIFEST + ".partial")
    _write_synced(tmp, manifest)
    try:
        os.replace(tmp, folder / MANIFEST)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    sync_folder(folder)


def _write_synced(path: Path, manifest: dict) -> None:
    """`manifest` as JSON at `path`, on disk when this returns; no file on any error."""
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(manifest, indent=1))
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
