"""The `numpy` backend: every operation in plain numpy, the reference the others are held to.

Codec bytes are decoded with each codec's numpy decoder (`Codec.decode_reference`), so no
compiled kernel is involved anywhere; slow, always there.
"""

from __future__ import annotations

import numpy as np

from ..quant.codecs import Codec
from .base import Backend


class NumpyBackend(Backend):
    """Every operation in numpy, codec bytes decoded by the codecs' numpy decoders."""

    name = "numpy"

    def decode(self, codec: Codec, raw: np.ndarray, cols: int) -> np.ndarray:
        return codec.decode_reference(raw, cols)
