"""A validating parser of GGUF headers: metadata and tensor records, no tensor data.

GGUF layout: magic "GGUF", version, tensor count, metadata count, the metadata (key, type,
value), the tensor records (name, dims, type, offset), then aligned tensor data. Arrays are
kept as lazy references (a 262k-entry vocabulary costs one pass over its length prefixes, not
262k numpy objects), and every count and length is checked against the bytes left in the file
before anything is allocated, so a hostile header fails with `ModelFileError`.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelFileError

GGUF_MAGIC = b"GGUF"
_SCALARS = {  # GGUF value type -> struct format
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
    12: "<d",
}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
          6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4
_MAX_NAME = 65536
MAX_STRING = 64 << 20  # bytes of one metadata string (a chat template is ~10 KB)
MAX_STRINGS = 1 << 22  # strings in one array (vocabularies have up to ~256k tokens)


@dataclass(frozen=True)
class LazyArray:
    """A metadata array left in the file; `count` items of GGUF type `item_type`."""

    item_type: int
    count: int
    offset: int  # where the first item starts
    nbytes: int = 0  # bytes the items span in the file


@dataclass(frozen=True)
class TensorRecord:
    name: str
    shape: tuple[int, ...]  # numpy order (slowest dimension first)
    ggml_type: int
    offset: int  # absolute byte offset of the data in the file


@dataclass
class GGUFHeader:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorRecord]
    data_offset: int
    file_size: int
    metadata_end: int  # byte offset where the metadata section ends (tensor records begin)

    def write_vocab_only(self, target: Path) -> None:
        """A GGUF holding this file's metadata and no tensors (enough for the tokenizer)."""
        with open(self.path, "rb") as src:
            src.seek(24)
            metadata = src.read(self.metadata_end - 24)
        with open(target, "wb") as out:
            out.write(GGUF_MAGIC + struct.pack("<IQQ", self.version, 0, len(self.metadata)))
            out.write(metadata)

    def array(self, key: str, raw: bool = False) -> np.ndarray | list | None:
        """Materialize a metadata array (numbers as numpy, strings as a list of str, or of
        bytes if `raw`)."""
        ref = self.metadata.get(key)
        if not isinstance(ref, LazyArray):
            return None
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if ref.item_type in _NUMPY:
                return np.frombuffer(m, _NUMPY[ref.item_type], ref.count, ref.offset).copy()
            cursor = _Cursor(m, ref.offset)
            read = cursor.raw_string if raw else cursor.string
            return [read() for _ in range(ref.count)]


class _Cursor:
    def __init__(self, buffer, pos: int = 0):
        self.buffer = buffer
        self.pos = pos
        self.size = len(buffer)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise ModelFileError(f"truncated GGUF: {what} at byte {self.pos} needs {n} bytes, "
                                 f"the file has {self.size}")

    def scalar(self, fmt: str, what: str = "value"):
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += n
        return value

    def raw_string(self, what: str = "string") -> bytes:
        length = self.scalar("<Q", what)
        self.need(length, what)
        if length > MAX_STRING:  # a sparse file can hold any length for free
            raise ModelFileError(f"GGUF {what}: a string of {length} bytes (limit "
                                 f"{MAX_STRING})")
        raw = bytes(self.buffer[self.pos:self.pos + length])
        self.pos += length
        return raw

    def string(self, what: str = "string") -> str:
        return self.raw_string(what).decode("utf-8", errors="replace")

    def skip_string(self, what: str) -> None:
        length = self.scalar("<Q", what)
        self.need(length, what)
        if length > MAX_STRING:
            raise ModelFileError(f"GGUF {what}: a string of {length} bytes (limit "
                                 f"{MAX_STRING})")
        self.pos += length

    def value(self, value_type: int, key: str):
        if value_type in _SCALARS:
            return self.scalar(_SCALARS[value_type], key)
        if value_type == _STRING:
            return self.string(key)
        if value_type == _ARRAY:
            item_type = self.scalar("<I", key)
            count = self.scalar("<Q", key)
            start = self.pos
            if item_type in _NUMPY:
                self.need(count * np.dtype(_NUMPY[item_type]).itemsize, key)
                self.pos += count * np.dtype(_NUMPY[item_type]).itemsize
            elif item_type == _STRING:
                self.need(count * 8, key)  # every string has at least its length prefix
                if count > MAX_STRINGS:
                    raise ModelFileError(f"GGUF metadata {key}: {count} strings (limit "
                                         f"{MAX_STRINGS})")
                for _ in range(count):
                    self.skip_string(key)
            else:
                raise ModelFileError(f"GGUF metadata {key}: unsupported array type {item_type}")
            return LazyArray(item_type, count, start, self.pos - start)
        raise ModelFileError(f"GGUF metadata {key}: unknown value type {value_type}")


def read_header(path: Path) -> GGUFHeader:
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or a device blocks or never ends
            raise ModelFileError(f"{path} is not a regular file")
        with open(path, "rb") as f:
            magic = f.read(4)
            if magic != GGUF_MAGIC:
                raise ModelFileError(f"{path} is not a GGUF file (it starts with {magic!r})")
            size = f.seek(0, 2)
            if size < 24:
                raise ModelFileError(f"truncated GGUF: {path} has only {size} bytes")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                return _parse(path, m, size)
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc.strerror or exc}") from None


def _parse(path: Path, buffer, size: int) -> GGUFHeader:
    cursor = _Cursor(buffer, 4)
    version = cursor.scalar("<I", "version")
    if version not in (2, 3):
        raise ModelFileError(f"{path}: unsupported GGUF version {version}")
    n_tensors = cursor.scalar("<Q", "tensor count")
    n_kv = cursor.scalar("<Q", "metadata count")
    if n_tensors > size // 32 or n_kv > size // 12:  # smallest possible records
        raise ModelFileError(f"truncated GGUF: {path} claims {n_tensors} tensors and {n_kv} "
                             "metadata entries, more than its size can hold")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cursor.string("metadata key")
        if key in metadata:  # llama.cpp refuses these too: which value would be meant?
            raise ModelFileError(f"{path}: metadata key {key!r} appears twice")
        metadata[key] = cursor.value(cursor.scalar("<I", key), key)
    metadata_end = cursor.pos
    records = []
    for _ in range(n_tensors):
        name = cursor.string("tensor name")
        if len(name) > _MAX_NAME:
            raise ModelFileError(f"{path}: tensor name longer than {_MAX_NAME} bytes")
        n_dims = cursor.scalar("<I", name)
        if not 1 <= n_dims <= _MAX_DIMS:
            raise ModelFileError(f"{path}: tensor {name} has {n_dims} dimensions")
        dims = [cursor.scalar("<Q", name) for _ in range(n_dims)]
        ggml_type = cursor.scalar("<I", name)
        offset = cursor.scalar("<Q", name)
        records.append((name, tuple(reversed(dims)), ggml_type, offset))
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelFileError(f"{path}: invalid general.alignment {alignment}")
    data_offset = -(-cursor.pos // alignment) * alignment
    tensors = {}
    for name, shape, ggml_type, offset in records:
        if name in tensors:
            raise ModelFileError(f"{path}: tensor {name} appears twice")
        tensors[name] = TensorRecord(name, shape, ggml_type, data_offset + offset)
    return GGUFHeader(path, version, metadata, tensors, data_offset, size, metadata_end)
