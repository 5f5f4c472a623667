"""Activation sparsity: calibration record, selectors, the windowed neuron cache, eval.

Sparse results are checked against what they must equal: gate-first with a zero threshold is
the dense FFN; a sparse run under a memory budget (neuron caches reading from the store)
computes the same neurons as the resident sparse run, for every window and cache size.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import flashinfer_ondevice as fi
from flashinfer_ondevice.build import calibrate as calibration
from flashinfer_ondevice.build.calibrate import calibrate
from flashinfer_ondevice.build.convert import convert
from flashinfer_ondevice.cli import main
from flashinfer_ondevice.errors import FlashInferError
from flashinfer_ondevice.memory import aligned_buffer
from flashinfer_ondevice.model import Transformer
from flashinfer_ondevice.runtime.neuron_cache import NeuronCache
from flashinfer_ondevice.runtime.planner import MIN_CACHE_ROWS, SparseSettings, make_plan
from flashinfer_ondevice.runtime.streamed import StreamedWeights
from flashinfer_ondevice.store.format import ALIGN
from flashinfer_ondevice.store.io import DirectReader
from flashinfer_ondevice.store.reader import StoreError, open_store

TEXT = " ".join(["the quick brown fox jumps over the lazy dog and runs far away"] * 60)
IDS = [1, *range(20, 44)]


@pytest.fixture(scope="module")
def calibrated(tiny_gguf, tmp_path_factory):
    """arch -> a calibrated tiny int8 store (calibrated once per module)."""
    folder = tmp_path_factory.mktemp("sparse")
    cache = {}

    def get(arch: str):
        if arch not in cache:
            path = convert(tiny_gguf(arch), folder / f"{arch}.store", "int8")
            calibrate(path, TEXT, tokens=600)
            cache[arch] = path
        return cache[arch]

    return get


def engine_for(path, budget, sparse, overhead=0):
    store = open_store(path)
    plan = make_plan(store, budget, ctx=64, overhead=overhead, sparse=sparse)
    reader = DirectReader(path / "weights.bin")
    weights = StreamedWeights(store, plan, reader)
    return Transformer(store.config, weights), plan, reader


def decode(engine, ids=IDS):
    cache = engine.new_cache(len(ids))
    return np.concatenate([engine.forward(np.array([t]), cache) for t in ids])


def test_calibration_is_recorded_and_validated(calibrated):
    path = calibrated("gemma3")
    store = open_store(path, verify=True)  # checksums include sparsity.bin
    record = store.sparsity
    assert record.targets == calibration.TARGETS
    assert record.rank == store.config.hidden_size  # capped by the hidden size
    for layer in record.layers:
        assert layer.thresholds == sorted(layer.thresholds)  # sparser = higher threshold
        assert all(t > 0 for t in layer.thresholds)
    # the predictor keeps at least `recall` of the neurons the target leaves (here it is
    # full rank, so about exactly that)
    kept = record.calibration["predicted_kept"]
    assert all(k >= record.recall * (1 - t) - 0.01
               for k, t in zip(kept, record.targets, strict=True))
    assert not [p for p in path.iterdir() if p.name.startswith(".calibration")]
    # defaults: the sparsest held-out setting that met the quality bar (else the lightest)
    scored = record.calibration["holdout"]
    assert scored and record.calibration["holdout_tokens"] > 0
    met = [s for s in scored if s["meets_bar"]]
    for selector in ("gate", "predicted"):  # scored in increasing order up to a first miss
        tried = [s for s in scored if s["selector"] == selector]
        assert [s["sparsity"] for s in tried] == record.targets[:len(tried)]
        assert all(s["meets_bar"] for s in tried[:-1])
    best = max((s["sparsity"] for s in met), default=record.targets[0])
    assert record.defaults["sparsity"] == best
    assert record.defaults["window"] == calibration.WINDOW


def test_quality_bar_keeps_a_standard_error_in_hand():
    assert calibration.meets_bar(1.0, 0.0, 100)
    assert not calibration.meets_bar(0.975, 0.0, 500)  # 97.5% +- 0.7%: not surely >= 97%
    assert calibration.meets_bar(0.99, 0.029, 500)
    assert not calibration.meets_bar(0.99, 0.031, 500)


def test_gate_first_selects_the_calibrated_fraction(calibrated):
    path = calibrated("gemma3")
    engine, _, reader = engine_for(path, None, SparseSettings("gate", 0.5, 4))
    decode(engine, [1, *range(30, 90)])
    n = engine.config
    kept = reader.stats.neurons_needed / (61 * n.ffn_size * n.n_layers)
    assert 0.3 < kept < 0.7  # 50% target, calibrated on other text


def test_zero_threshold_gate_first_is_the_dense_ffn(calibrated):
    path = calibrated("llama")
    dense, _, _ = engine_for(path, None, None)
    sparse, _, reader = engine_for(path, None, SparseSettings("gate", 0.3, 4))
    for ffn in sparse.weights.ffns.values():
        ffn.selector.threshold = -1.0  # every neuron passes
    expected = decode(dense)
    np.testing.assert_allclose(decode(sparse), expected, rtol=0, atol=1e-5 * abs(expected).max())
    cfg = sparse.config
    assert reader.stats.neurons_needed == len(IDS) * cfg.ffn_size * cfg.n_layers


@pytest.mark.parametrize("selector", ["gate", "predicted"])
def test_neuron_caches_compute_what_resident_sparse_does(calibrated, selector):
    """Same neurons, same kernels; cached rows are summed in another order, and the fp16 KV
    cache can turn that 1e-7 difference into one fp16 step (2^-11 relative) of a key, so
    positions after the first agree to 1e-3 of the largest logit, not bitwise. (Where the
    first step falls depends on the calibrated thresholds: a fresh checkout's CI measured
    2e-5 of the largest logit at position 5.)"""
    path = calibrated("gemma3")
    resident, _, _ = engine_for(path, None, SparseSettings(selector, 0.5, 1))
    expected = decode(resident)
    store = open_store(path)
    bundle = store.tensors["layers.0.ffn"].row_nbytes
    ffn_size = store.config.ffn_size
    smallest = make_plan(store, 10**12, 64, 0, sparse=SparseSettings(selector, 0.5, 1))
    for window in (1, 4):
        # every neuron fits / the smallest caches: about one token's neurons, sometimes fewer
        for budget, cache_rows in ((10**12, ffn_size), (smallest.fixed_bytes, MIN_CACHE_ROWS)):
            engine, plan, reader = engine_for(path, budget, SparseSettings(selector, 0.5,
                                                                           window))
            assert plan.cache_rows == cache_rows
            got = decode(engine)
            np.testing.assert_allclose(got[:1], expected[:1], rtol=0,
                                       atol=1e-5 * abs(expected).max())
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3 * abs(expected).max())
            assert (got.argmax(1) == expected.argmax(1)).all()
            s = reader.stats
            assert s.neurons_needed > 0 and s.neurons_read > 0
            assert s.neuron_hits + s.neurons_read == s.neurons_needed
            if cache_rows == ffn_size and window > 1:
                assert s.neuron_hits > s.neurons_read  # the window keeps most
            assert s.bytes_read >= s.neurons_read * bundle


def test_neuron_cache_keeps_the_window_and_the_right_bytes(calibrated):
    path = calibrated("gemma3")
    entry = open_store(path).tensors["layers.2.ffn"]
    reader = DirectReader(path / "weights.bin")
    cache = NeuronCache(entry, reader, capacity=100, window=2, scratch=aligned_buffer(1 << 16),
                        spill=np.zeros((8, entry.row_nbytes), np.uint8), activation="gelu_tanh")
    bundles = np.fromfile(entry.path, np.uint8, entry.nbytes, offset=entry.offset).reshape(
        entry.rows, -1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(entry.cols).astype(np.float32)
    history = []
    for _ in range(12):
        needed = np.sort(rng.choice(entry.rows, rng.integers(10, 60), replace=False))
        history.append(set(needed.tolist()))
        cache.apply(x, needed)
        held = cache.ids[:cache.size]
        assert len(set(held.tolist())) == cache.size <= cache.capacity
        assert set(held.tolist()) <= history[-1] | history[-2] if len(history) > 1 else True
        assert history[-1] <= set(held.tolist())  # this token's neurons are all cached
        np.testing.assert_array_equal(cache.row_of[held], np.arange(cache.size))
        np.testing.assert_array_equal(cache.rows[:cache.size], bundles[held])


def test_a_cache_smaller_than_a_token_uses_its_hits_before_evicting(calibrated):
    path = calibrated("gemma3")
    entry = open_store(path).tensors["layers.1.ffn"]
    x = np.random.default_rng(1).standard_normal(entry.cols).astype(np.float32)
    needed = np.arange(3, entry.rows, 2)  # 62 neurons
    gate_act = np.random.default_rng(2).standard_normal(len(needed)).astype(np.float32)
    spill = np.zeros((10, entry.row_nbytes), np.uint8)
    full = NeuronCache(entry, DirectReader(path / "weights.bin"), entry.rows, 1,
                       aligned_buffer(1 << 16), spill, "gelu_tanh")
    expected = full.apply(x, needed, gate_act)
    reader = DirectReader(path / "weights.bin")
    small = NeuronCache(entry, reader, capacity=25, window=1, scratch=aligned_buffer(1 << 16),
                        spill=spill, activation="gelu_tanh")
    first = (entry.offset + needed * entry.row_nbytes) // ALIGN
    last = (entry.offset + (needed + 1) * entry.row_nbytes - 1) // ALIGN
    pages = len(set(first.tolist()) | set(last.tolist()))
    for step in range(3):
        before = reader.stats.snapshot()
        got = small.apply(x, needed, gate_act)
        s = reader.stats.since(before)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * abs(expected).max())
        assert s.neuron_hits == (0 if step == 0 else small.capacity)
        assert s.neurons_read == len(needed) - s.neuron_hits
        assert s.bytes_read >= s.neurons_read * entry.row_nbytes
        # the overflow goes through the 10 spill rows: cache reads plus one batch per 10
        # neurons, each page read at most once per batch
        batches = 1 + -(-(len(needed) - small.capacity) // len(spill))
        assert s.bytes_read <= batches * pages * ALIGN
        assert set(small.ids[:small.size].tolist()) <= set(needed.tolist())


def test_interrupted_calibration_leaves_a_working_store(calibrated, tmp_path, monkeypatch):
    path = shutil.copytree(calibrated("llama"), tmp_path / "store")

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # before the store changes: it stays as it was
        m.setattr(calibration, "write_predictors", fail)
        with pytest.raises(KeyboardInterrupt):
            calibrate(path, TEXT, tokens=300)
    assert open_store(path, verify=True).sparsity is not None
    monkeypatch.setattr(calibration, "sync_folder", fail)  # between the two manifests
    with pytest.raises(KeyboardInterrupt):
        calibrate(path, TEXT, tokens=300)
    store = open_store(path, verify=True)  # still consistent, now without calibration
    assert store.sparsity is None
    with pytest.raises(FlashInferError, match="no sparsity calibration"):
        fi.load(path, selector="gate")


def _edit(change):
    def edit(path):
        manifest = json.loads((path / "manifest.json").read_text())
        change(manifest)
        (path / "manifest.json").write_text(json.dumps(manifest))
    return edit


@pytest.mark.parametrize("edit, message", [
    (_edit(lambda m: m["sparsity"].update(rank=10**6)), "rank"),
    (_edit(lambda m: m["sparsity"]["layers"][0]["thresholds"].__setitem__(0, -1.0)),
     "thresholds are invalid"),
    (_edit(lambda m: m["sparsity"]["layers"].pop()), "wrong number of layers"),
    (_edit(lambda m: m["sparsity"]["defaults"].update(selector="magic")), "defaults"),
    (_edit(lambda m: m["sparsity"].update(file="../weights.bin")), "malformed"),
    (lambda p: (p / "sparsity.bin").write_bytes(b"\0" * 64), "sparsity.bin has 64 bytes"),
])
def test_corrupt_sparsity_records_are_refused(calibrated, tmp_path, edit, message):
    path = shutil.copytree(calibrated("llama"), tmp_path / "store")
    edit(path)
    with pytest.raises(StoreError, match=message):
        open_store(path)


def test_sparsity_settings_are_checked(calibrated):
    path = calibrated("llama")
    with pytest.raises(FlashInferError, match="was not calibrated"):
        fi.load(path, selector="gate", sparsity=0.42)
    with pytest.raises(FlashInferError, match="unknown selector"):
        fi.load(path, selector="oracle")
    # asked for: the store's defaults fill in what was not given
    defaults = open_store(path).sparsity.defaults
    assert fi.load(path, selector="gate").plan.sparse == SparseSettings(
        "gate", defaults["sparsity"], defaults["window"])
    assert fi.load(path, selector="dense").plan.sparse is None


def test_default_sparsity_runs_unasked_only_where_it_pays(calibrated, tmp_path):
    path = shutil.copytree(calibrated("llama"), tmp_path / "store")
    _edit(lambda m: m["sparsity"]["defaults"].update(selector="gate", sparsity=0.05))(path)
    assert fi.load(path).plan.sparse is None  # 5% saves too little to pay its overhead
    _edit(lambda m: m["sparsity"]["defaults"].update(sparsity=0.5))(path)
    assert fi.load(path).plan.sparse == SparseSettings("gate", 0.5, calibration.WINDOW)
    # under a budget neurons are read by the page: these 204-byte bundles share pages with
    # ~20 others, so skipping half the neurons skips no page
    assert fi.load(path, memory_budget="2GB").plan.sparse is None
    assert fi.load(path, memory_budget="2GB", sparsity=0.5).plan.sparse is not None


def test_eval_command_reports_quality_against_dense(calibrated, tmp_path):
    path = calibrated("gemma3")
    text = tmp_path / "eval.txt"
    text.write_text("a lazy dog runs over the quick brown fox " * 20)
    runner = CliRunner()
    dense = runner.invoke(main, ["eval", "-m", str(path), "-f", str(text), "--json",
                                 "--compare-dense", "--selector", "dense", "-c", "64",
                                 "--quality", "exact"])
    assert dense.exit_code == 0, dense.output
    report = json.loads(dense.output)
    assert report["top1_agreement"] == 1.0 and report["mean_kl"] < 1e-9
    assert report["perplexity"] == pytest.approx(report["reference_perplexity"])
    assert report["tokens"] > 100
    sparse = runner.invoke(main, ["eval", "-m", str(path), "-f", str(text), "--json",
                                  "--compare-dense", "--selector", "gate", "--sparsity", "0.7",
                                  "-c", "64", "--memory-budget", "2GB"])
    assert sparse.exit_code == 0, sparse.output
    report = json.loads(sparse.output)
    assert report["mean_kl"] > 0 and report["neurons_needed_per_token"] > 0
    assert report["bytes_read_per_token"] > 0


def test_convert_calibrate_cli(tiny_gguf, tmp_path):
    text = tmp_path / "cal.txt"
    text.write_text(TEXT)
    out = tmp_path / "store"
    result = CliRunner().invoke(main, ["convert", str(tiny_gguf("qwen2")), "-o", str(out),
                                       "--calibrate", "-f", str(text),
                                       "--calibration-tokens", "300"])
    assert result.exit_code == 0, result.output
    record = open_store(out).sparsity
    assert record.calibration["tokens"] + record.calibration["holdout_tokens"] >= 300
    assert (f"defaults: {record.defaults['selector']} selector at "
            f"{record.defaults['sparsity']:.0%} sparsity") in result.output
    again = CliRunner().invoke(main, ["convert", str(out)])
    assert again.exit_code == 1 and "already a flash store" in again.output


def test_sparse_ffn_matches_numpy_on_the_selected_neurons(calibrated):
    """Kernel path (resident rows and permuted cache rows, gate activations passed in or
    recomputed) against float32 numpy on the same decoded weights."""
    from flashinfer_ondevice.functional import gelu_tanh
    from flashinfer_ondevice.quant.codecs import codec

    path = calibrated("gemma3")
    for budget in (None, 10**12):
        engine, _, _ = engine_for(path, budget, SparseSettings("gate", 0.5, 2))
        ffn = engine.weights.ffns[3]
        entry = open_store(path).tensors["layers.3.ffn"]
        raw = np.fromfile(entry.path, np.uint8, entry.nbytes, offset=entry.offset).reshape(
            entry.rows, -1)
        c, rb = codec(entry.codec), entry.row_nbytes // 3
        gate, up, down = (c.decode(raw[:, k * rb:(k + 1) * rb], entry.cols) for k in range(3))
        rng = np.random.default_rng(1)
        for _ in range(4):  # later tokens find the cache rows permuted
            x = rng.standard_normal((1, entry.cols)).astype(np.float32)
            act = gelu_tanh(x[0] @ gate.T)
            ids, _ = ffn.selector.select(x[0])
            clear = np.abs(np.abs(act) - ffn.selector.threshold) > 1e-4
            np.testing.assert_array_equal(ids[clear[ids]],
                                          np.flatnonzero((np.abs(act) > ffn.selector.threshold)
                                                         & clear))
            expected = (act[ids] * (x[0] @ up[ids].T)) @ down[ids]
            got = ffn.apply(x)[0]
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * abs(expected).max())


def test_every_sparse_budget_plans_a_ring_when_something_streams(calibrated):
    path = calibrated("gemma3")
    store = open_store(path)
    sparse = SparseSettings("gate", 0.5, 2)
    low = make_plan(store, 10**12, 64, 0, sparse=sparse).fixed_bytes
    high = low + sum(e.nbytes for e in store.tensors.values())
    for budget in np.linspace(low, high, 25).astype(int):
        plan = make_plan(store, int(budget), 64, 0, sparse=sparse)
        assert plan.streamed_bytes == 0 or plan.buffers >= 2, budget
    middle = make_plan(store, (low + high) // 2, 64, 0, sparse=sparse)
    engine, _, _ = engine_for(path, middle.budget, sparse)
    assert np.isfinite(decode(engine, IDS[:4])).all()


def test_predictor_fit_recovers_a_low_rank_gate():
    from flashinfer_ondevice.build.calibrate import fit_layer
    from flashinfer_ondevice.functional import gelu_tanh

    rng = np.random.default_rng(0)
    x = rng.standard_normal((800, 32)).astype(np.float32)
    w = rng.standard_normal((96, 6)) @ rng.standard_normal((6, 32)) / 8  # rank 6
    g = (x @ w.T).astype(np.float32)
    layer, kept = fit_layer(x, g, gelu_tanh, 6, 0.95, [0.3, 0.5])
    np.testing.assert_allclose(x @ layer.a @ layer.b, g, atol=1e-3 * abs(g).max())
    for k, t in zip(kept, [0.3, 0.5], strict=True):
        assert abs(k - 0.95 * (1 - t)) < 0.02  # exact predictor: recall x active fraction
    layer, _ = fit_layer(x, g, gelu_tanh, 2, 0.95, [0.5])  # rank too low: approximate
    assert np.abs(x @ layer.a @ layer.b - g).max() > 1e-2 * abs(g).max()


def test_rank_and_file_size_must_agree(calibrated, tmp_path):
    path = shutil.copytree(calibrated("llama"), tmp_path / "store")
    _edit(lambda m: m["sparsity"].update(rank=1))(path)
    with pytest.raises(StoreError, match="should hold"):
        open_store(path)


def test_sparsity_needs_a_compressed_store_and_eval_a_real_context(tiny_gguf, calibrated,
                                                                   tmp_path):
    f16 = convert(tiny_gguf("llama"), tmp_path / "f16.store", "f16")
    calibrate(f16, TEXT, tokens=300)
    with pytest.raises(FlashInferError, match="codec with fused kernels"):
        fi.load(f16, selector="gate")
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    result = CliRunner().invoke(main, ["eval", "-m", str(calibrated("llama")), "-f", str(text),
                                       "-c", "2"])
    assert result.exit_code == 2 and "--ctx-size" in result.output  # 3 tokens at least


def test_plan_notes_caches_smaller_than_a_token(calibrated):
    store = open_store(calibrated("gemma3"))
    sparse = SparseSettings("gate", 0.3, 1)
    roomy = make_plan(store, 10**12, 64, 0, sparse=sparse)
    tight = make_plan(store, roomy.fixed_bytes, 64, 0, sparse=sparse)
    assert tight.cache_rows == MIN_CACHE_ROWS < 0.7 * store.config.ffn_size
    assert "more than the caches hold" in tight.describe(store)
    assert "note" not in roomy.describe(store)
