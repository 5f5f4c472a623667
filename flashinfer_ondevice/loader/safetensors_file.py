"""A validating reader of .safetensors files (8-byte header length, JSON header, raw data).

Written here rather than taken from `safetensors.numpy` because numpy cannot represent BF16
(the dtype of most published checkpoints) and because every offset must be checked against
the file before anything is allocated.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

from ..errors import ModelFileError, UnsupportedModelError
from ..values import describe, integer, printable

_MAX_HEADER = 100 * 1024 * 1024
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


class SafetensorsFile:
    """Tensor names, shapes and byte ranges of one file; tensors read on request."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise ModelFileError(f"{path}: too short to be a safetensors file")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > min(_MAX_HEADER, size - 8):
                    raise ModelFileError(f"{path}: header length {header_len} exceeds the file")
                header = json.loads(f.read(header_len))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ModelFileError(f"{path}: unreadable safetensors header ({exc})") from None
        if not isinstance(header, dict):
            raise ModelFileError(f"{path}: safetensors header is not a JSON object")
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not isinstance(metadata, dict):
            raise ModelFileError(f"{path}: safetensors __metadata__ is not a JSON object")
        self._data_start = 8 + header_len
        data_size = size - self._data_start
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            entry = _entry(path, name, info, data_size)
            self.entries[name] = entry

    def read(self, name: str) -> np.ndarray:
        """The tensor as float32."""
        dtype, shape, begin, end = self.entries[name]
        raw = np.fromfile(self.path, dtype=np.uint8, count=end - begin,
                          offset=self._data_start + begin)
        if len(raw) != end - begin:
            raise ModelFileError(f"{self.path}: truncated while reading {name}")
        values = raw.view(_DTYPES[dtype])
        if dtype == "BF16":
            values = (values.astype(np.uint32) << 16).view(np.float32)
        values = values.astype(np.float32, copy=False).reshape(shape)
        if not np.isfinite(values).all():
            raise ModelFileError(f"{self.path}: tensor {name} holds NaN or infinite values")
        return values


def _entry(path: Path, name: str, info, data_size: int) -> tuple[str, tuple[int, ...], int, int]:
    """One header entry (dtype, shape, data_offsets), checked against the data's size."""
    if not isinstance(info, dict) or not isinstance(info.get("shape"), list) or \
            not isinstance(info.get("data_offsets"), list) or len(info["data_offsets"]) != 2:
        raise ModelFileError(f"{path}: malformed entry for tensor {printable(name)}")
    dtype = info.get("dtype")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise UnsupportedModelError(f"{path}: tensor {printable(name)} has unsupported dtype "
                                    f"{describe(dtype)}")
    shape = tuple(integer(n, f"{path}: tensor {printable(name)} shape", 0, 1 << 40)
                  for n in info["shape"])
    begin, end = (integer(n, f"{path}: tensor {printable(name)} data_offsets", 0, 1 << 60)
                  for n in info["data_offsets"])
    n_bytes = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
    if not (begin <= end <= data_size) or end - begin != n_bytes:
        raise ModelFileError(f"{path}: tensor {printable(name)} has a byte range outside the "
                             "file or inconsistent with its shape")
    return dtype, shape, begin, end
