"""Fitting palettes (per-row look-up tables) to weight rows: the encoder side of the palette
codecs (quant/codecs.py), after DKM/eDKM and SqueezeLLM.

1. Clusters: per row, 1-D k-means over the row's values, each value weighted by the second
   moment E[x_j^2] of the input it multiplies (collected at calibration; uniform without
   one). Weighted 1-D k-means is solved on the sorted row with prefix sums: clusters are
   intervals, so an iteration costs O(cols) per row.
2. Tables: with the assignments fixed, the table entries of each row that minimise the
   output error over the calibration inputs, (w - A c)^T H (w - A c) with H = E[x x^T], are
   the solution of (A^T H A) c = A^T H w: exact least squares, a K x K system per row.

Both steps only lower the weighted error of what step 1 gives (step 2 is exact for the
assignments), so the tables never get worse for having been refined; the caller keeps the
refined tables only where they lower the error measured with H.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

KMEANS_ITERATIONS = 30
REFINE_ELEMENTS = 1 << 25  # one-hot entries refined at a time (bounds the temporaries)


@njit(parallel=True, cache=True)
def _kmeans_rows(w, weight, k, iterations, centroids, assign):
    """Weighted 1-D k-means of every row of w (n, cols): centroids (n, k) ascending,
    assign (n, cols) the index of each value's centroid."""
    n, cols = w.shape
    for r in prange(n):
        order = np.argsort(w[r])
        values = w[r][order]
        weights = weight[order]
        mass = np.zeros(cols + 1)
        moment = np.zeros(cols + 1)
        for j in range(cols):
            mass[j + 1] = mass[j] + weights[j]
            moment[j + 1] = moment[j] + weights[j] * values[j]
        c = np.empty(k)
        for i in range(k):  # start at the weighted quantiles
            j = np.searchsorted(mass, (i + 0.5) / k * mass[cols]) - 1
            c[i] = values[min(max(j, 0), cols - 1)]
        bounds = np.zeros(k + 1, np.int64)
        for _ in range(iterations):
            bounds[k] = cols
            for i in range(1, k):
                bounds[i] = np.searchsorted(values, 0.5 * (c[i - 1] + c[i]))
            moved = False
            for i in range(k):
                m = mass[bounds[i + 1]] - mass[bounds[i]]
                if m > 0:
                    new = (moment[bounds[i + 1]] - moment[bounds[i]]) / m
                    if new != c[i]:
                        moved = True
                    c[i] = new
            if not moved:
                break
        for i in range(k):
            centroids[r, i] = c[i]
        mids = np.empty(k - 1)
        for i in range(k - 1):
            mids[i] = 0.5 * (c[i] + c[i + 1])
        for j in range(cols):
            assign[r, j] = np.searchsorted(mids, w[r, j])


def kmeans(rows: np.ndarray, k: int, weight: np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """(tables (n, k) float32 ascending, indices (n, cols) uint8) of weighted 1-D k-means."""
    rows = np.ascontiguousarray(rows, np.float32)
    n, cols = rows.shape
    weight = np.ones(cols) if weight is None else np.asarray(weight, np.float64)
    weight = np.maximum(weight, 1e-12 * max(float(weight.max()), 1e-30))
    tables = np.empty((n, k), np.float64)
    indices = np.empty((n, cols), np.uint8)
    _kmeans_rows(rows, weight, k, KMEANS_ITERATIONS, tables, indices)
    return tables.astype(np.float32), indices


def refine(rows: np.ndarray, indices: np.ndarray, tables: np.ndarray,
           hessian: np.ndarray) -> np.ndarray:
    """Tables (n, k) minimising (w - A c)^T H (w - A c) per row for the fixed assignments;
    rows where the solve is worse than `tables` (ill-conditioned) keep their old table."""
    n, cols = rows.shape
    k = tables.shape[1]
    refined = tables.copy()
    h = np.asarray(hessian, np.float32)
    block = max(1, REFINE_ELEMENTS // (cols * k))
    for start in range(0, n, block):
        end = min(start + block, n)
        w = rows[start:end].astype(np.float32)
        onehot = np.zeros((end - start, cols, k), np.float32)
        np.put_along_axis(onehot, indices[start:end, :, None].astype(np.int64), 1.0, axis=2)
        # ha[r] = H @ A_r  (cols, k): one GEMM for the block of rows
        ha = (h @ onehot.transpose(1, 0, 2).reshape(cols, -1)).reshape(cols, end - start, k)
        ha = ha.transpose(1, 0, 2)
        gram = np.einsum("rjk,rjl->rkl", onehot, ha)  # A^T H A
        rhs = np.einsum("rjk,rj->rk", ha, w)  # A^T H w
        ridge = 1e-6 * np.maximum(np.einsum("rkk->r", gram), 1e-30)
        gram += ridge[:, None, None] * np.eye(k, dtype=np.float32)
        solved = np.linalg.solve(gram, rhs[..., None])[..., 0]
        old = tables[start:end]
        better = _weighted_error(w, indices[start:end], solved, ha) < \
            _weighted_error(w, indices[start:end], old, ha)
        refined[start:end][better] = solved[better]
    return refined


def _weighted_error(w: np.ndarray, indices: np.ndarray, tables: np.ndarray,
                    ha: np.ndarray) -> np.ndarray:
    """Per row, (A c)^T H (A c) - 2 (A c)^T H w: the H-weighted error up to a constant."""
    approx = np.take_along_axis(tables, indices.astype(np.int64), axis=1)
    c_h_a = np.einsum("rk,rjk->rj", tables, ha)  # (H A c) per row
    return np.einsum("rj,rj->r", c_h_a, approx) - 2 * np.einsum("rj,rj->r", c_h_a, w)
