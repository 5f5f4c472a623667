"""numba kernels of the cpu backend's own operations (the codecs' product kernels live with
the codecs, quant/kernels.py and quant/palette_kernels.py).

RMS norm: numpy spends ~7 us per norm of 640 values, mostly call overhead, and a Gemma 3
token runs ~110 of them; one compiled loop costs ~2.7 us.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, fastmath=False)
def rms_norm_rows(x, weight, eps, out):
    """out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight, accumulated in float64."""
    n = x.shape[1]
    for r in range(x.shape[0]):
        total = 0.0
        for j in range(n):
            total += np.float64(x[r, j]) * x[r, j]
        inv = np.float32(1.0 / np.sqrt(total / n + eps))
        for j in range(n):
            out[r, j] = (x[r, j] * inv) * weight[j]
