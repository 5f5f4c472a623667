"""Codecs: round trips within each codec's stated error, every fused kernel against the
codec's numpy decode (the backends' operations: tests/test_backends.py), palette fitting
(weighted k-means, least-squares tables) and the input
statistics calibration collects for it."""

from __future__ import annotations

import numpy as np
import pytest

from flashinfer_ondevice.functional import ACTIVATIONS, rms_norm
from flashinfer_ondevice.quant import block_palette_fit, palette_fit
from flashinfer_ondevice.quant.codecs import (
    CODECS,
    InputStats,
    codec,
    pack_indices,
    unpack_indices,
)

FUSED = [name for name, c in CODECS.items() if c.fused]
PALETTES = [name for name in CODECS if name.startswith("pal")]
BLOCK_PALETTES = [name for name in CODECS if name.startswith("bpal")]
BLOCK_FITTED = [*BLOCK_PALETTES, "int4fit"]  # fitted by quant/block_palette_fit.py


def rows(n: int, cols: int, seed: int = 0) -> np.ndarray:
    """Heavy-tailed rows, like real weights (a few large values per row)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_t(4, (n, cols)) * 0.02).astype(np.float32)


@pytest.mark.parametrize("name", list(CODECS))
def test_round_trip_within_the_stated_error(name):
    c = codec(name)
    w = rows(64, 640)
    raw = c.encode(w)
    assert raw.shape == (64, c.row_nbytes(640)) and raw.dtype == np.uint8
    decoded = c.decode(raw, 640)
    np.testing.assert_array_equal(decoded, c.decode_reference(raw, 640))
    if name == "f16":
        np.testing.assert_array_equal(decoded, w.astype(np.float16).astype(np.float32))
    elif name in BLOCK_FITTED:  # every value decodes to the grid value nearest it at its
        # block's stored scale
        size, dtype = c.scale_blocks.size, np.dtype(c.scale_blocks.dtype)
        blocks = 640 // size
        scales = raw[:, :dtype.itemsize * blocks].view(dtype).astype(np.float32)
        steps = np.repeat(scales, size, axis=1)[..., None] * c.grid.astype(np.float32)
        nearest = np.abs(w[..., None] - steps).min(-1)
        np.testing.assert_allclose(np.abs(decoded - w), nearest, atol=1e-6)
        peaks = np.abs(w.reshape(64, blocks, -1)).max(-1, keepdims=True)
        assert (np.abs(decoded - w).reshape(64, blocks, -1) <= peaks).all()
    elif name.startswith("int"):
        grouped = w.reshape(64, -1, c.group)
        err = (decoded - w).reshape(64, -1, c.group)
        scale = np.abs(grouped).max(-1, keepdims=True) / c.limit
        if c.search_scales:  # per group never worse than rounding at amax/limit; better overall
            plain = np.clip(np.rint(grouped / scale), c.lowest, c.limit) * scale - grouped
            assert ((err ** 2).sum(-1) <= (plain ** 2).sum(-1) * (1 + 1e-4)).all()
            assert (err ** 2).sum() < 0.8 * (plain ** 2).sum()
        else:  # within half a step of each group's scale
            assert (np.abs(err) <= scale / 2 * (1 + 1e-5)).all()
    else:  # every value decodes to its row's nearest table entry (unweighted k-means)
        tables = raw[:, :2 * c.entries].view(np.float16).astype(np.float32)
        assert (np.diff(tables, axis=1) >= 0).all()  # ascending
        nearest = np.abs(w[:, :, None] - tables[:, None, :]).min(-1)
        np.testing.assert_allclose(np.abs(decoded - w), nearest, atol=2e-3 * np.abs(w).max())


def test_palettes_spend_their_bits_better_than_uniform_steps():
    """Per row, a 4-bit palette fits a heavy-tailed row better than int4's uniform steps at
    amax/7 at fewer bytes (int4's searched scales do better still), and each bit less costs
    error."""
    w = rows(256, 640)
    error = {n: float(np.sqrt(((codec(n).decode(codec(n).encode(w), 640) - w) ** 2).mean()))
             for n in ("int4", "pal4", "pal3", "pal2")}
    grouped = w.reshape(256, -1, 64)
    step = np.abs(grouped).max(-1, keepdims=True) / 7
    uniform = float(np.sqrt(((np.clip(np.rint(grouped / step), -8, 7) * step - grouped) ** 2)
                            .mean()))
    assert codec("pal4").row_nbytes(640) < codec("int4").row_nbytes(640)
    assert error["int4"] < error["pal4"] < uniform
    assert error["pal4"] < error["pal3"] < error["pal2"]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_index_packing_round_trips(bits):
    rng = np.random.default_rng(1)
    indices = rng.integers(0, 1 << bits, (5, 64)).astype(np.uint8)
    packed = pack_indices(indices, bits)
    assert packed.shape == (5, 64 * bits // 8)
    np.testing.assert_array_equal(unpack_indices(packed, 64, bits), indices)


@pytest.mark.parametrize("name", FUSED)
def test_kernels_match_the_numpy_decode(name):
    c = codec(name)
    hidden, ffn = 128, 96
    rng = np.random.default_rng(2)
    x = rng.standard_normal(hidden).astype(np.float32)
    raw = c.encode(rows(ffn, hidden))
    dense = c.decode_reference(raw, hidden)
    out = np.empty(ffn, np.float32)
    c.matvec(raw, x, out)
    np.testing.assert_allclose(out, dense @ x, rtol=1e-4, atol=1e-5)
    for n in (1, 2, 3, 7):  # odd and even counts (kernels may take rows in pairs)
        part = np.empty(n, np.float32)
        c.matvec(raw[:n], x, part)
        np.testing.assert_allclose(part, dense[:n] @ x, rtol=1e-4, atol=1e-5)
    for start in (1, 2, 3):  # a row's product does not depend on where its matrix starts
        part = np.empty(ffn - start, np.float32)  # (streamed chunks: bitwise as resident)
        c.matvec(np.ascontiguousarray(raw[start:]), x, part)
        np.testing.assert_array_equal(part, out[start:])

    gate, up, down_t = rows(ffn, hidden, 3), rows(ffn, hidden, 4), rows(ffn, hidden, 5)
    bundles = np.concatenate([c.encode(gate), c.encode(up), c.encode(down_t)], axis=1)
    g, u, d = (c.decode_reference(c.encode(m), hidden) for m in (gate, up, down_t))
    act = ACTIVATIONS["gelu_tanh"]
    selected = np.array([0, 5, 17, 40, 95])
    hidden_act = np.empty(len(selected), np.float32)
    out = np.empty(hidden, np.float32)
    c.bundle_ffn(bundles, selected, x, "gelu_tanh", None, hidden_act, out)
    expected_h = act(g[selected] @ x) * (u[selected] @ x)
    np.testing.assert_allclose(hidden_act, expected_h, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out, expected_h @ d[selected], rtol=1e-4, atol=1e-6)
    gates = np.empty(ffn, np.float32)
    c.gate_activations(bundles, x, "gelu_tanh", gates)
    np.testing.assert_allclose(gates, act(g @ x), rtol=1e-4, atol=1e-6)
    c.bundle_ffn(bundles, selected, x, "gelu_tanh", gates[selected], hidden_act, out)
    np.testing.assert_allclose(out, expected_h @ d[selected], rtol=1e-4, atol=1e-6)


def test_bpal3_stores_its_codes_in_a_low_and_a_high_plane():
    """bpal3's levels are a sum of a low part (a cubic in the low 2 bits) and a step times
    the high bit, and its rows hold the codes as documented (docs/store-format.md): the low
    2 bits packed four to a byte, then the high bits eight to a byte, lowest first."""
    c = codec("bpal3")
    d3, d2, d1, d0, step = c.cubic.astype(np.float64)
    low = np.array([((d3 * u + d2) * u + d1) * u + d0 for u in range(4)])
    np.testing.assert_allclose(c.levels, np.concatenate([low, low + step]), atol=1e-6)
    np.testing.assert_array_equal(np.sort(c.levels), c.grid)
    codes = np.random.default_rng(3).integers(0, 8, (1, 64))
    w = c.levels[codes] * 0.25  # exact values at scale 0.25: each decodes to its own code
    raw = c.encode(w)
    payload = raw[0, 2 * (64 // block_palette_fit.BLOCK):]
    low_plane, high_plane = payload[:16], payload[16:]
    for j in range(64):
        assert (low_plane[j // 4] >> (2 * (j % 4))) & 3 == codes[0, j] & 3
        assert (high_plane[j // 8] >> (j % 8)) & 1 == codes[0, j] >> 2
    np.testing.assert_array_equal(c.decode_reference(raw, 64), w)


@pytest.mark.parametrize("name", BLOCK_PALETTES)
def test_block_palette_kernels_agree_with_the_decode_at_every_width(name):
    """Every kernel matches the decode for rows from Gemma 3's width to a 7B model's and
    wider (a single FFN bundle row is as wide as the model)."""
    c = codec(name)
    rng = np.random.default_rng(6)
    widths = [w for w in (640, 2048, 4352, 8448) if c.supports(w)]
    for width in widths:
        x = rng.standard_normal(width).astype(np.float32)
        raw = c.encode(rows(6, width, seed=width))
        dense = c.decode_reference(raw, width)
        out = np.empty(6, np.float32)
        c.matvec(raw, x, out)
        np.testing.assert_allclose(out, dense @ x, rtol=1e-4, atol=1e-4)
        bundles = np.concatenate([raw[:2], raw[2:4], raw[4:]], axis=1)
        gate_act = np.empty(2, np.float32)
        c.gate_activations(bundles, x, "gelu_tanh", gate_act)
        act = ACTIVATIONS["gelu_tanh"]
        np.testing.assert_allclose(gate_act, act(dense[:2] @ x), rtol=1e-4, atol=1e-5)
        hidden_act, ffn_out = np.empty(2, np.float32), np.empty(width, np.float32)
        c.bundle_ffn(bundles, np.arange(2), x, "gelu_tanh", None, hidden_act, ffn_out)
        expected = act(dense[:2] @ x) * (dense[2:4] @ x)
        np.testing.assert_allclose(hidden_act, expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ffn_out, expected @ dense[4:], rtol=1e-4, atol=1e-5)


def test_weighted_kmeans_spends_the_palette_where_inputs_are_large():
    w = rows(32, 256)
    weight = np.ones(256)
    weight[:16] = 1000.0  # inputs of the first 16 columns are large
    _, plain = palette_fit.kmeans(w, 4)
    tables_w, weighted = palette_fit.kmeans(w, 4, weight)
    tables_p, _ = palette_fit.kmeans(w, 4)
    err_plain = np.take_along_axis(tables_p, plain.astype(np.int64), 1) - w
    err_weighted = np.take_along_axis(tables_w, weighted.astype(np.int64), 1) - w
    weighted_cost = lambda e: float((e ** 2 * weight).sum())  # noqa: E731
    assert weighted_cost(err_weighted) < 0.5 * weighted_cost(err_plain)


def test_least_squares_tables_lower_the_output_error():
    """For fixed assignments the refined tables minimise E|x.(w - w_hat)|^2 over correlated
    inputs: never worse than k-means, and at the optimum the gradient vanishes."""
    rng = np.random.default_rng(6)
    mix = rng.standard_normal((64, 64))
    x = rng.standard_normal((4096, 64)) @ mix  # strongly correlated inputs
    h = (x.T @ x / len(x)).astype(np.float32)
    w = rows(16, 64)
    tables, indices = palette_fit.kmeans(w, 4, np.diag(h))
    refined = palette_fit.refine(w, indices, tables, h)

    def output_error(t):
        delta = np.take_along_axis(t, indices.astype(np.int64), 1) - w
        return np.einsum("ri,ij,rj->r", delta, h, delta)

    assert (output_error(refined) <= output_error(tables) * (1 + 1e-4)).all()
    assert output_error(refined).sum() < 0.97 * output_error(tables).sum()
    onehot = np.eye(4)[indices]  # (rows, cols, k)
    delta = np.take_along_axis(refined, indices.astype(np.int64), 1) - w
    gradient = np.einsum("rjk,jl,rl->rk", onehot, h, delta)
    assert np.abs(gradient).max() < 1e-3 * np.abs(np.einsum("rjk,jl,rl->rk", onehot, h, w)).max()


def test_error_feedback_assignments_lower_the_output_error():
    """Assigning columns with their rounding errors pushed onto the columns still to come
    (GPTQ's order) beats nearest-entry assignment on correlated inputs, and fit() keeps the
    better of the two in every row."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((4096, 128)) @ rng.standard_normal((128, 128))
    h = x.T @ x / len(x)
    h = (h + 0.01 * np.diag(h).mean() * np.eye(128)).astype(np.float32)  # damped as convert's
    w = rows(24, 128)
    tables, nearest = palette_fit.kmeans(w, 8, np.diag(h))
    tables = palette_fit.refine(w, nearest, tables, h)
    fed = palette_fit.feedback_assign(w, tables, h)
    fed_tables = palette_fit.refine(w, fed, tables, h)
    before = palette_fit.weighted_error(w, nearest, tables, h)
    after = palette_fit.weighted_error(w, fed, fed_tables, h)
    assert after.sum() < 0.7 * before.sum()
    fit_tables, fit_indices = palette_fit.fit(w, 8, np.diag(h), h)
    np.testing.assert_array_less(palette_fit.weighted_error(w, fit_indices, fit_tables, h),
                                 np.minimum(before, after) * (1 + 1e-5) + 1e-12)


def test_column_feedback_lowers_the_output_error_of_a_matrix_stored_by_columns():
    """The down projection is stored by columns; spreading each column's error over the
    columns still to come lowers E|x (W - W_hat)^T|^2 against fitting each column alone,
    and encode_columns stores what fit_columns found."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((4096, 96)) @ (np.eye(96) + 0.1 * rng.standard_normal((96, 96)))
    h = x.T @ x / len(x)
    h = (h + 0.01 * np.diag(h).mean() * np.eye(96)).astype(np.float32)
    columns = rows(96, 64)  # W (64 outputs, 96 inputs) by columns

    def output_error(tables, indices):
        d = columns - np.take_along_axis(tables, indices.astype(np.int64), 1)
        return float(np.einsum("ic,ij,jc->", d, h, d))

    alone = output_error(*palette_fit.kmeans(columns, 8))
    fed_tables, fed_indices = palette_fit.fit_columns(columns, 8, h)
    assert output_error(fed_tables, fed_indices) < 0.8 * alone
    c = codec("pal3")
    decoded = c.decode(c.encode_columns(columns, InputStats(np.diag(h), h)), 64)
    expected = np.take_along_axis(fed_tables.astype(np.float16).astype(np.float32),
                                  fed_indices.astype(np.int64), 1)
    np.testing.assert_array_equal(decoded, expected)


def test_palette_encode_uses_the_statistics():
    """With statistics of correlated inputs the encoded rows have a lower output error."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4096, 64)) @ rng.standard_normal((64, 64))
    x[:, :4] *= 20  # a few large input channels, as in real models
    h = (x.T @ x / len(x)).astype(np.float32)
    w = rows(32, 64)
    c = codec("pal3")
    plain = c.decode(c.encode(w), 64) - w
    fitted = c.decode(c.encode(w, InputStats(np.diag(h).copy(), h)), 64) - w
    error = lambda e: float(np.einsum("ri,ij,rj->", e, h, e))  # noqa: E731
    assert error(fitted) < 0.5 * error(plain)


def test_input_statistics_of_the_first_layer():
    """The collector's attention-input statistics of layer 0 are E[x x^T] of the normed
    embeddings (plus the stated damping), and E[x_j^2] is their diagonal."""
    from flashinfer_ondevice.build.input_stats import DAMPING, InputStatsCollector

    config, weights = _tiny_float_model()
    chunks = [np.array([1, 5, 9, 3, 7]), np.array([1, 2, 2, 8])]
    collector = InputStatsCollector(config, weights, chunks)
    stats = collector.layer(0, weights.layers[0])
    x = np.concatenate([rms_norm(weights.embed[c] * np.float32(np.sqrt(config.hidden_size)),
                                 weights.layers[0].attn_norm, config.norm_eps)
                        for c in chunks]).astype(np.float64)
    expected = x.T @ x / len(x)
    np.testing.assert_allclose(stats["wq"].second_moment, np.diag(expected), rtol=1e-4)
    damped = expected + DAMPING * np.diag(expected).mean() * np.eye(len(expected))
    np.testing.assert_allclose(stats["wk"].hessian, damped, rtol=1e-4, atol=1e-7)
    assert stats["wq"] is stats["wv"]  # one input, one record
    assert set(stats) == {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}
    assert stats["w_down"].hessian.shape == (config.ffn_size, config.ffn_size)
    assert collector.tokens == 9


def _tiny_float_model():
    """A random Gemma 3 geometry small enough to run in a test, as float32 Weights."""
    from flashinfer_ondevice.config import ModelConfig
    from flashinfer_ondevice.weights import LayerWeights, Weights

    config = ModelConfig(arch="gemma3", vocab_size=16, hidden_size=32, n_layers=2, n_heads=2,
                         n_kv_heads=1, head_dim=16, ffn_size=48, norm_eps=1e-6,
                         rope_theta=10000.0, context_length=64, sliding_window=4,
                         sliding_window_pattern=2, rope_theta_local=10000.0,
                         tie_embeddings=True)
    rng = np.random.default_rng(8)
    m = lambda *shape: (rng.standard_normal(shape) * 0.2).astype(np.float32)  # noqa: E731
    ones = lambda n: np.ones(n, np.float32) + m(n)  # noqa: E731
    layers = [LayerWeights(attn_norm=ones(32), wq=m(32, 32), wk=m(16, 32), wv=m(16, 32),
                           wo=m(32, 32), ffn_norm=ones(32), w_gate=m(48, 32), w_up=m(48, 32),
                           w_down=m(32, 48), q_norm=ones(16), k_norm=ones(16),
                           post_attn_norm=ones(32), post_ffn_norm=ones(32))
              for _ in range(2)]
    return config, Weights(embed=m(16, 32), layers=layers, final_norm=ones(32))


def _correlated_stats(cols: int, seed: int) -> InputStats:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4096, cols)) @ (np.eye(cols) + 0.3 * rng.standard_normal(
        (cols, cols)))
    x[:, :4] *= 10  # a few large input channels, as in real models
    h = x.T @ x / len(x)
    h = (h + 0.01 * np.diag(h).mean() * np.eye(cols)).astype(np.float32)
    return InputStats(np.diag(h).copy(), h)


@pytest.mark.parametrize("name", BLOCK_FITTED)
def test_block_palette_fit_lowers_the_output_error(name):
    """Scales refitted by least squares and indices assigned with error feedback lower
    (w - w_hat)^T H (w - w_hat) against the scale search alone, for rows and for rows that
    are a matrix's columns; encode stores what the fit found."""
    c = codec(name)
    stats = _correlated_stats(128, 11)
    h = stats.hessian.astype(np.float64)
    w = rows(48, 128, 12).astype(np.float64)
    grid, blocks = c.grid.astype(np.float64), c.scale_blocks
    searched_scales, searched = block_palette_fit.search(w, grid, None, blocks)
    alone = block_palette_fit.weighted_error(w, searched, searched_scales, grid, h, blocks)
    scales, indices = block_palette_fit.fit(w, grid, stats.second_moment, h, blocks)
    fitted = block_palette_fit.weighted_error(w, indices, scales, grid, h, blocks)
    assert (fitted <= alone * (1 + 1e-9)).all() and fitted.sum() < 0.8 * alone.sum()
    np.testing.assert_allclose(c.decode(c.encode(w, stats), 128),
                               block_palette_fit.decode(scales, indices, grid, blocks), rtol=1e-6)

    columns = rows(128, 64, 13)  # W (64 outputs, 128 inputs) by columns

    def output_error(decoded):
        d = columns - decoded
        return float(np.einsum("ic,ij,jc->", d, h, d))

    plain = output_error(c.decode(c.encode(columns), 64))
    fed = output_error(c.decode(c.encode_columns(columns, stats), 64))
    assert fed < 0.9 * plain


def test_int4fit_rows_are_int4_rows_with_less_output_error():
    """int4fit writes int4's layout: a float32 scale per 64 values, then values -8..7 stored
    +8, low nibble first (decoded here by hand); fitted to the statistics it has less
    H-weighted error than int4's rounding."""
    stats = _correlated_stats(128, 21)
    h = stats.hessian.astype(np.float64)
    w = rows(64, 128, 22)
    fitted = codec("int4fit").encode(w, stats)
    assert fitted.shape[1] == codec("int4").row_nbytes(128)
    scales = fitted[:, :8].view(np.float32)
    nibbles = np.stack([fitted[:, 8:] & 15, fitted[:, 8:] >> 4], axis=-1).reshape(64, 128)
    by_hand = np.repeat(scales, 64, axis=1) * (nibbles.astype(np.float32) - 8)
    np.testing.assert_array_equal(codec("int4").decode(fitted, 128), by_hand)

    def output_error(raw):
        d = (w - codec("int4").decode(raw, 128)).astype(np.float64)
        return float(np.einsum("rj,jk,rk->", d, h, d))

    assert output_error(fitted) < 0.8 * output_error(codec("int4").encode(w))


def test_block_scales_beat_row_tables_on_rows_whose_magnitude_varies():
    """Weights whose size changes along the row (what block-quantized sources such as
    GGUF's Q5_0/Q8_0 have): a scale per 32 weights spends 4 bits better than one table per
    row, at no more bytes than int4."""
    rng = np.random.default_rng(14)
    w = rows(64, 640) * np.repeat(rng.uniform(0.2, 3.0, (64, 20)), 32, axis=1).astype(
        np.float32)
    error = {n: float(((codec(n).decode(codec(n).encode(w), 640) - w) ** 2).mean())
             for n in ("int4", "pal4", "bpal4")}
    assert codec("bpal4").row_nbytes(640) <= codec("int4").row_nbytes(640)
    assert error["bpal4"] < 0.7 * min(error["pal4"], error["int4"])
