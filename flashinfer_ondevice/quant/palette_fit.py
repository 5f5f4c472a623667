"""Fitting palettes (per-row look-up tables) to weight rows: the encoder side of the palette
codecs (quant/codecs.py), after DKM/eDKM and SqueezeLLM.

1. Clusters: per row, 1-D k-means over the row's values, each value weighted by the second
   moment E[x_j^2] of the input it multiplies (collected at calibration; uniform without
   one). Weighted 1-D k-means is solved on the sorted row with prefix sums: clusters are
   intervals, so an iteration costs O(cols) per row.
2. Assignments with error feedback (GPTQ's column order, Frantar et al. 2022): with H = E[x x^T]
   and U the upper Cholesky factor of H^-1, the columns are assigned one at a time, in order of
   decreasing E[x_j^2], to the nearest table entry, and each one's rounding error is spread
   over the columns not yet assigned (w_l -= e_j U_jl / U_jj), which the inputs' correlations
   let absorb it. Nearest-entry assignment ignores those correlations.
   For rows that are a matrix's columns (the FFN's down projection, stored by neuron), the
   same feedback runs across rows: row i multiplies input i, so a whole row is fitted at
   once (unweighted k-means: its values share one input) and its error spread over the
   rows still to come; see fit_columns.
3. Tables: with the assignments fixed, the table entries of each row that minimise the
   output error over the calibration inputs, (w - A c)^T H (w - A c) with H = E[x x^T], are
   the solution of (A^T H A) c = A^T H w: exact least squares, a K x K system per row.

Step 3 is exact for the assignments, so refined tables never raise the H-weighted error; the
encoder alternates steps 2 and 3 a few rounds and keeps, per row, whichever assignment (the
nearest-entry one or a round's) with its refined table has the lowest H-weighted error, so
step 2 never makes a row worse.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

KMEANS_ITERATIONS = 30
ROWS_PER_BLOCK = 16384  # rows fitted at a time (bounds the temporaries)
FEEDBACK_ROUNDS = 3  # steps 2 and 3 alternated (each round's tables seed the next)


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


@njit(parallel=True, cache=True)
def _feedback_rows(w, tables, order, u, assign):
    """Step 2 for every row of w (n, cols): `order` is the column order, `u` the upper
    Cholesky factor of H^-1 permuted to it; assign (n, cols) gets each column's entry."""
    n, cols = w.shape
    k = tables.shape[1]
    for r in prange(n):
        row = np.empty(cols)
        for j in range(cols):
            row[j] = w[r, order[j]]
        for j in range(cols):
            value = row[j]
            best, best_distance = 0, abs(value - tables[r, 0])
            for i in range(1, k):
                distance = abs(value - tables[r, i])
                if distance < best_distance:
                    best, best_distance = i, distance
            assign[r, order[j]] = best
            error = (value - tables[r, best]) / u[j, j]
            for m in range(j + 1, cols):
                row[m] -= error * u[j, m]


def feedback_factor(hessian: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, U) of the error feedback: inputs by decreasing E[x_j^2], and the upper
    Cholesky factor of H^-1 with H permuted to that order."""
    h = np.asarray(hessian, np.float64)
    order = np.argsort(-np.diag(h), kind="stable")
    inverse = np.linalg.inv(h[np.ix_(order, order)])
    return order, np.linalg.cholesky(0.5 * (inverse + inverse.T)).T


def feedback_assign(rows: np.ndarray, tables: np.ndarray, hessian: np.ndarray) -> np.ndarray:
    """Indices (n, cols) uint8 of each weight's table entry, assigned column by column with
    each rounding error pushed onto the columns still to come (step 2)."""
    order, u = feedback_factor(hessian)
    assign = np.empty(rows.shape, np.uint8)
    _feedback_rows(np.ascontiguousarray(rows, np.float32),
                   np.ascontiguousarray(tables, np.float64), order, u, assign)
    return assign


@njit(parallel=True, cache=True, fastmath=True)
def _normal_equations(w, indices, h, gram, rhs):
    """Per row r: gram[r] = A^T H A and rhs[r] = A^T H w for the one-hot assignment matrix A
    of indices[r]. H A is built by summing rows of H (H is symmetric) into the entry each
    column is assigned to: O(cols^2) per row, not the O(cols^2 k) of a dense product."""
    n, cols = w.shape
    k = gram.shape[1]
    for r in prange(n):
        ha = np.zeros((k, cols), np.float32)  # ha[i] = (H A)[:, i]
        for j in range(cols):
            ha[indices[r, j]] += h[j]
        for i in range(k):
            total = np.float32(0.0)
            for j in range(cols):
                total += ha[i, j] * w[r, j]
                gram[r, i, indices[r, j]] += ha[i, j]
            rhs[r, i] = total


def refine(rows: np.ndarray, indices: np.ndarray, tables: np.ndarray,
           hessian: np.ndarray) -> np.ndarray:
    """Tables (n, k) minimising (w - A c)^T H (w - A c) per row for the fixed assignments;
    rows where the solve is worse than `tables` (ill-conditioned) keep their old table."""
    rows = np.ascontiguousarray(rows, np.float32)
    if len(rows) > ROWS_PER_BLOCK:
        return np.concatenate([refine(rows[s:s + ROWS_PER_BLOCK], indices[s:s + ROWS_PER_BLOCK],
                                      tables[s:s + ROWS_PER_BLOCK], hessian)
                               for s in range(0, len(rows), ROWS_PER_BLOCK)])
    n, k = tables.shape
    h = np.ascontiguousarray(hessian, np.float32)
    gram = np.zeros((n, k, k), np.float32)
    rhs = np.zeros((n, k), np.float32)
    _normal_equations(rows, np.ascontiguousarray(indices, np.uint8), h, gram, rhs)
    ridge = 1e-6 * np.maximum(np.einsum("rkk->r", gram), 1e-30)
    gram += ridge[:, None, None] * np.eye(k, dtype=np.float32)
    solved = np.linalg.solve(gram.astype(np.float64), rhs[..., None].astype(np.float64))[..., 0]
    better = weighted_error(rows, indices, solved, h) < weighted_error(rows, indices, tables, h)
    refined = np.array(tables, np.float32)
    refined[better] = solved[better]
    return refined


def weighted_error(rows: np.ndarray, indices: np.ndarray, tables: np.ndarray,
                   hessian: np.ndarray) -> np.ndarray:
    """Per row, (w - A c)^T H (w - A c): the output error the calibration inputs see."""
    h = np.asarray(hessian, np.float64)
    errors = np.empty(len(rows))
    for s in range(0, len(rows), ROWS_PER_BLOCK):
        approx = np.take_along_axis(tables[s:s + ROWS_PER_BLOCK],
                                    indices[s:s + ROWS_PER_BLOCK].astype(np.int64), axis=1)
        diff = (rows[s:s + ROWS_PER_BLOCK] - approx).astype(np.float64)
        errors[s:s + ROWS_PER_BLOCK] = np.einsum("rj,rj->r", diff @ h, diff)
    return errors


def fit(rows: np.ndarray, k: int, second_moment: np.ndarray | None = None,
        hessian: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tables (n, k) float32, indices (n, cols) uint8) for `rows`: step 1, then steps 2 and
    3 alternated with a Hessian (a damped one: see build/input_stats); step 1 alone without."""
    rows = np.ascontiguousarray(rows, np.float32)
    tables, indices = kmeans(rows, k, second_moment)
    if hessian is None:
        return tables, indices
    tables = refine(rows, indices, tables, hessian)
    error = weighted_error(rows, indices, tables, hessian)
    fed_tables = tables
    for _ in range(FEEDBACK_ROUNDS):
        fed = feedback_assign(rows, fed_tables, hessian)
        fed_tables = refine(rows, fed, fed_tables, hessian)
        fed_error = weighted_error(rows, fed, fed_tables, hessian)
        better = fed_error < error
        tables[better], indices[better], error[better] = \
            fed_tables[better], fed[better], fed_error[better]
    return tables, indices


COLUMN_BLOCK = 128  # rows fitted one by one before the later rows get their updates at once


def fit_columns(rows: np.ndarray, k: int, hessian: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """(tables, indices) for rows that are the columns of a matrix W (rows[i] = W[:, i]),
    whose inputs have E[x x^T] = `hessian` (n, n): in order of decreasing E[x_i^2], each row
    gets k-means' table on its current values, and its error e is pushed onto the rows not
    yet fitted (row_l -= e U_il / U_ii), GPTQ's update with a row for a column. The rows of
    a block are updated one by one, later rows once per block (one product)."""
    w = np.array(rows, np.float64)
    n = len(w)
    order, u = feedback_factor(hessian)
    w = w[order]
    tables = np.empty((n, k), np.float32)
    indices = np.empty(w.shape, np.uint8)
    for start in range(0, n, COLUMN_BLOCK):
        end = min(start + COLUMN_BLOCK, n)
        errors = np.empty((end - start, w.shape[1]))
        for i in range(start, end):
            table, index = kmeans(w[i:i + 1], k)
            tables[i], indices[i] = table[0], index[0]
            errors[i - start] = (w[i] - table[0][index[0]]) / u[i, i]
            w[i + 1:end] -= np.outer(u[i, i + 1:end], errors[i - start])
        w[end:] -= u[start:end, end:].T @ errors
    restore = np.empty_like(order)
    restore[order] = np.arange(n)
    return tables[restore], indices[restore]
