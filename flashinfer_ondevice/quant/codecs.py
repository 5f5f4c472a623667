"""Store codecs: how a float32 matrix row becomes bytes on flash, and back.

Every codec encodes rows independently (one FFN neuron's gate row, up row and down column can
be bundled together, an embedding row read alone). A row is `[scales][payload]`:

  f16   payload = float16 values, no scales                          16 bits/weight
  int8  scale = amax/127 per group of 64 (float32), int8 values       8.5 bits/weight
  int4  scale = amax/7 per group of 64 (float32), values in -8..7
        packed two per byte (low nibble first, stored +8)             4.5 bits/weight

Scales are float32 (not float16) so the numba kernels in kernels.py can read them directly.
Palettization (k-means look-up tables) and BitStack blocks will join through the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GROUP = 64


@dataclass(frozen=True)
class Codec:
    name: str
    bits: int  # bits per stored value (16, 8 or 4)

    def supports(self, cols: int) -> bool:
        return self.name == "f16" or cols % GROUP == 0

    def groups(self, cols: int) -> int:
        return 0 if self.name == "f16" else cols // GROUP

    def row_nbytes(self, cols: int) -> int:
        return 4 * self.groups(cols) + cols * self.bits // 8

    def encode(self, rows: np.ndarray) -> np.ndarray:
        """(n, cols) float32 -> (n, row_nbytes) uint8."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        n, cols = rows.shape
        if self.name == "f16":
            return rows.astype(np.float16).view(np.uint8).reshape(n, -1)
        if not self.supports(cols):
            raise ValueError(f"{self.name} needs rows in whole groups of {GROUP}, got {cols}")
        grouped = rows.reshape(n, -1, GROUP)
        limit = 127 if self.bits == 8 else 7
        scales = np.abs(grouped).max(axis=-1) / limit
        safe = np.where(scales > 0, scales, 1.0)[..., None]
        q = np.clip(np.rint(grouped / safe), -limit - (self.bits == 4), limit).astype(np.int8)
        if self.bits == 8:
            payload = q.reshape(n, cols).view(np.uint8)
        else:
            nibbles = (q.reshape(n, cols) + 8).astype(np.uint8)
            payload = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
        return np.concatenate([scales.astype(np.float32).view(np.uint8).reshape(n, -1),
                               payload], axis=1)

    def decode(self, raw: np.ndarray, cols: int) -> np.ndarray:
        """(n, row_nbytes) uint8 -> (n, cols) float32."""
        raw = np.ascontiguousarray(raw)
        n = raw.shape[0]
        if self.name == "f16":
            return raw.view(np.float16).reshape(n, cols).astype(np.float32)
        ng = self.groups(cols)
        scales = raw[:, :4 * ng].view(np.float32).reshape(n, ng, 1)
        payload = raw[:, 4 * ng:]
        if self.bits == 8:
            q = payload.view(np.int8).reshape(n, ng, GROUP)
        else:
            q = np.empty((n, cols), np.int8)
            q[:, 0::2] = (payload & 0x0F).astype(np.int8) - 8
            q[:, 1::2] = (payload >> 4).astype(np.int8) - 8
            q = q.reshape(n, ng, GROUP)
        return (q * scales).reshape(n, cols)


CODECS = {c.name: c for c in (Codec("f16", 16), Codec("int8", 8), Codec("int4", 4))}


def codec(name: str) -> Codec:
    if name not in CODECS:
        raise ValueError(f"unknown codec '{name}' (known: {', '.join(CODECS)})")
    return CODECS[name]
