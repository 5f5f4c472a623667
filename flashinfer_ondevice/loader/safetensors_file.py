"""A validating reader of .safetensors files (8-byte header length, JSON header, raw data).

Written here rather than taken from `safetensors.numpy` because numpy cannot represent BF16
(the dtype of most published checkpoints) and because every offset must be checked against
the file before anything is allocated.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from ..errors import ModelFileError, UnsupportedModelError

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
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelFileError(f"{path}: unreadable safetensors header ({exc})") from None
        if not isinstance(header, dict):
            raise ModelFileError(f"{path}: safetensors header is not a JSON object")
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        data_size = size - self._data_start
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype, shape = info["dtype"], tuple(int(n) for n in info["shape"])
                begin, end = (int(n) for n in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ModelFileError(f"{path}: malformed entry for tensor {name}") from None
            if dtype not in _DTYPES:
                raise UnsupportedModelError(f"{path}: tensor {name} has unsupported dtype {dtype}")
            n_bytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
            if not (0 <= begin <= end <= data_size) or end - begin != n_bytes:
                raise ModelFileError(f"{path}: tensor {name} has a byte range outside the file "
                                     "or inconsistent with its shape")
            self.entries[name] = (dtype, shape, begin, end)

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
        return values.astype(np.float32, copy=False).reshape(shape)
