"""Fitting block-scaled palettes to weight rows: the encoder side of the bpal codecs and
of int4fit (quant/codecs.py). A weight is `scale[block] * grid[index]`: one fixed table of
2^b values shared by every row (`grid`), one scale per block of weights, a b-bit index per
weight. `ScaleBlocks` says how wide a block is and how its scale is stored (the bpal
codecs: float16 per 32 weights; int4fit, whose grid is int4's -8 .. 7: float32 per 64).

1. Scales: per block, a search over scales near max|w| / max|grid| (llama.cpp's IQ4_NL
   search): for each candidate, nearest-entry indices, then the least-squares scale for
   them weighted by the second moment E[x_j^2] of the input each weight multiplies; the
   candidate with the least weighted error wins.
2. Indices with error feedback (GPTQ, Frantar et al. 2022, with scales fixed before it
   runs, "static groups"): columns in order of decreasing E[x_j^2], each assigned the
   nearest grid value at its block's scale, its rounding error spread over the columns not
   yet assigned through the Cholesky factor of H^-1, H = E[x x^T] (palette_fit's factor).
3. Scales refitted: with the indices fixed, the block scales that minimise the output error
   (w - A s)^T H (w - A s), where A[j, block(j)] = grid[index_j], solve the normal
   equations (A^T H A) s = A^T H w: exact least squares, block-wise sparse, O(cols^2) per row.

Steps 2 and 3 alternate a few rounds; each row keeps whichever of step 1's fit and the
rounds' has the least H-weighted error, so feedback never makes a row worse. Rows that are
a matrix's columns (the FFN's down projection, stored by neuron) get steps 1 per row and the
feedback across rows (fit_columns), as palette_fit does for the per-row palettes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from .palette_fit import COLUMN_BLOCK, FEEDBACK_ROUNDS, ROWS_PER_BLOCK, feedback_factor

BLOCK = 32  # weights per scale of the bpal codecs (float16)
SCALE_STEPS = 9  # step 1 tries 2 * SCALE_STEPS + 1 scales per block
SCALE_STEP = 0.05  # relative spacing of the tried scales


@dataclass(frozen=True)
class ScaleBlocks:
    """One scale per `size` weights of a row, stored as `dtype`."""

    size: int
    dtype: type

    def as_stored(self, scales: np.ndarray) -> np.ndarray:
        """Scales as the row stores them (finite), back in float64."""
        top = float(np.finfo(self.dtype).max)
        return np.clip(scales, -top, top).astype(self.dtype).astype(np.float64)


HALF_32 = ScaleBlocks(BLOCK, np.float16)  # the bpal codecs'


@njit(cache=True, inline="always")
def _nearest(grid, v):
    """Index of the grid value nearest v (grid ascending)."""
    best, best_distance = 0, abs(v - grid[0])
    for i in range(1, grid.shape[0]):
        distance = abs(v - grid[i])
        if distance < best_distance:
            best, best_distance = i, distance
    return best


@njit(parallel=True, cache=True)
def _search_scales(w, importance, grid, block, scales):
    """Step 1's scale for every block of every row of w (n, cols)."""
    n, cols = w.shape
    top = grid[0] if abs(grid[0]) >= abs(grid[-1]) else grid[-1]  # the widest entry
    for r in prange(n):
        for b in range(cols // block):
            start = b * block
            peak = 0.0
            for j in range(start, start + block):
                if abs(w[r, j]) > abs(peak):
                    peak = w[r, j]
            best_error, best_scale = np.inf, 0.0
            if peak != 0.0:
                for t in range(-SCALE_STEPS, SCALE_STEPS + 1):
                    trial = peak / (top * (1.0 + SCALE_STEP * t))
                    sum_gw, sum_gg = 0.0, 0.0
                    for j in range(start, start + block):
                        g = grid[_nearest(grid, w[r, j] / trial)]
                        sum_gw += importance[j] * g * w[r, j]
                        sum_gg += importance[j] * g * g
                    if sum_gg <= 0.0 or sum_gw == 0.0:
                        continue
                    scale = sum_gw / sum_gg
                    error = 0.0
                    for j in range(start, start + block):
                        e = w[r, j] - scale * grid[_nearest(grid, w[r, j] / scale)]
                        error += importance[j] * e * e
                    if error < best_error:
                        best_error, best_scale = error, scale
            scales[r, b] = best_scale


@njit(parallel=True, cache=True)
def _assign_nearest(w, grid, block, scales, indices):
    """indices = each weight's nearest grid value at its block's scale."""
    n, cols = w.shape
    zero = _nearest(grid, 0.0)
    for r in prange(n):
        for j in range(cols):
            scale = scales[r, j // block]
            indices[r, j] = _nearest(grid, w[r, j] / scale) if scale != 0.0 else zero


@njit(parallel=True, cache=True)
def _feedback_rows(w, grid, block, scales, order, u, indices):
    """Step 2 for every row of w: `order` the column order, `u` the permuted factor."""
    n, cols = w.shape
    zero = _nearest(grid, 0.0)
    for r in prange(n):
        row = np.empty(cols)
        for j in range(cols):
            row[j] = w[r, order[j]]
        for j in range(cols):
            column = order[j]
            scale = scales[r, column // block]
            k = _nearest(grid, row[j] / scale) if scale != 0.0 else zero
            indices[r, column] = k
            error = (row[j] - scale * grid[k]) / u[j, j]
            for m in range(j + 1, cols):
                row[m] -= error * u[j, m]


@njit(parallel=True, cache=True, fastmath=True)
def _normal_equations(w, indices, grid, block, h, gram, rhs):
    """Per row: gram = A^T H A, rhs = A^T H w for A[j, block(j)] = grid[indices[j]]."""
    n, cols = w.shape
    blocks = cols // block
    for r in prange(n):
        ha = np.zeros((blocks, cols))  # ha[b] = (H A)[:, b]
        for j in range(cols):
            ha[j // block] += grid[indices[r, j]] * h[j]
        for b in range(blocks):
            total = 0.0
            for j in range(cols):
                total += ha[b, j] * w[r, j]
                gram[r, b, j // block] += ha[b, j] * grid[indices[r, j]]
            rhs[r, b] = total


def weighted_error(rows: np.ndarray, indices: np.ndarray, scales: np.ndarray,
                   grid: np.ndarray, hessian: np.ndarray, blocks: ScaleBlocks = HALF_32
                   ) -> np.ndarray:
    """Per row, (w - A s)^T H (w - A s)."""
    errors = np.empty(len(rows))
    for s in range(0, len(rows), ROWS_PER_BLOCK):
        diff = rows[s:s + ROWS_PER_BLOCK] - decode(scales[s:s + ROWS_PER_BLOCK],
                                                   indices[s:s + ROWS_PER_BLOCK], grid, blocks)
        errors[s:s + ROWS_PER_BLOCK] = np.einsum("rj,rj->r", diff @ hessian, diff)
    return errors


def decode(scales: np.ndarray, indices: np.ndarray, grid: np.ndarray,
           blocks: ScaleBlocks = HALF_32) -> np.ndarray:
    """(n, cols) float64 weights of (scales (n, blocks), indices (n, cols))."""
    return np.repeat(scales, blocks.size, axis=1) * grid[indices]


def refine(rows: np.ndarray, indices: np.ndarray, scales: np.ndarray, grid: np.ndarray,
           hessian: np.ndarray, blocks: ScaleBlocks = HALF_32) -> np.ndarray:
    """Step 3: the least-squares scales (as stored) for fixed indices; a row whose solve is
    worse than `scales` (ill-conditioned) keeps them."""
    if len(rows) > ROWS_PER_BLOCK:
        return np.concatenate([refine(rows[s:s + ROWS_PER_BLOCK], indices[s:s + ROWS_PER_BLOCK],
                                      scales[s:s + ROWS_PER_BLOCK], grid, hessian, blocks)
                               for s in range(0, len(rows), ROWS_PER_BLOCK)])
    n, count = scales.shape
    gram = np.zeros((n, count, count))
    rhs = np.zeros((n, count))
    _normal_equations(rows, indices, grid, blocks.size, hessian, gram, rhs)
    ridge = 1e-9 * np.maximum(np.einsum("rkk->r", gram), 1e-30)
    gram += ridge[:, None, None] * np.eye(count)
    solved = blocks.as_stored(np.linalg.solve(gram, rhs[..., None])[..., 0])
    better = (weighted_error(rows, indices, solved, grid, hessian, blocks)
              < weighted_error(rows, indices, scales, grid, hessian, blocks))
    refined = scales.copy()
    refined[better] = solved[better]
    return refined


def search(rows: np.ndarray, grid: np.ndarray, second_moment: np.ndarray | None = None,
           blocks: ScaleBlocks = HALF_32) -> tuple[np.ndarray, np.ndarray]:
    """Step 1 alone: (scales (n, blocks) as stored, indices (n, cols) uint8)."""
    n, cols = rows.shape
    importance = np.ones(cols) if second_moment is None else \
        np.maximum(np.asarray(second_moment, np.float64), 1e-30)
    scales = np.zeros((n, cols // blocks.size))
    indices = np.zeros((n, cols), np.uint8)
    _search_scales(rows, importance, grid, blocks.size, scales)
    scales = blocks.as_stored(scales)
    _assign_nearest(rows, grid, blocks.size, scales, indices)  # at the scales as stored
    return scales, indices


def fit(rows: np.ndarray, grid: np.ndarray, second_moment: np.ndarray | None = None,
        hessian: np.ndarray | None = None, blocks: ScaleBlocks = HALF_32
        ) -> tuple[np.ndarray, np.ndarray]:
    """(scales (n, blocks) float64 of stored values, indices (n, cols) uint8) for `rows`:
    step 1, then steps 2 and 3 alternated with a Hessian; step 1 alone without."""
    w = np.ascontiguousarray(rows, np.float64)
    scales, indices = search(w, grid, second_moment, blocks)
    if hessian is None:
        return scales, indices
    h = np.asarray(hessian, np.float64)
    order, u = feedback_factor(h)
    scales = refine(w, indices, scales, grid, h, blocks)
    error = weighted_error(w, indices, scales, grid, h, blocks)
    fed_scales = scales
    for _ in range(FEEDBACK_ROUNDS):
        fed = np.empty_like(indices)
        _feedback_rows(w, grid, blocks.size, fed_scales, order, u, fed)
        fed_scales = refine(w, fed, fed_scales, grid, h, blocks)
        fed_error = weighted_error(w, fed, fed_scales, grid, h, blocks)
        better = fed_error < error
        scales[better], indices[better], error[better] = \
            fed_scales[better], fed[better], fed_error[better]
    return scales, indices


def fit_columns(rows: np.ndarray, grid: np.ndarray, hessian: np.ndarray,
                blocks: ScaleBlocks = HALF_32) -> tuple[np.ndarray, np.ndarray]:
    """(scales, indices) for rows that are the columns of a matrix whose inputs have
    E[x x^T] = `hessian`: in order of decreasing E[x_i^2] each row gets step 1 on its
    current values and its error is pushed onto the rows not yet fitted (as
    palette_fit.fit_columns: one by one within a block of rows, later rows per block)."""
    w = np.array(rows, np.float64)
    n, cols = w.shape
    order, u = feedback_factor(hessian)
    w = w[order]
    scales = np.empty((n, cols // blocks.size))
    indices = np.empty((n, cols), np.uint8)
    for start in range(0, n, COLUMN_BLOCK):
        end = min(start + COLUMN_BLOCK, n)
        errors = np.empty((end - start, cols))
        for i in range(start, end):
            s, q = search(w[i:i + 1], grid, None, blocks)
            scales[i], indices[i] = s[0], q[0]
            errors[i - start] = (w[i] - decode(s, q, grid, blocks)[0]) / u[i, i]
            w[i + 1:end] -= np.outer(u[i, i + 1:end], errors[i - start])
        w[end:] -= u[start:end, end:].T @ errors
    restore = np.empty_like(order)
    restore[order] = np.arange(n)
    return scales[restore], indices[restore]
