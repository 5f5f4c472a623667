"""Backends: every installed backend's operations against the numpy decode of every codec,
resident matrices a backend prepares (onnxruntime's MatMulNBits, MLX) against the codec's
float products, and the tiny models run end to end through every installed backend against
the numpy backend."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import write_hf_folder

import flashinfer_ondevice as fi
from flashinfer_ondevice.backends import BACKENDS, installed_backends, make_backend, onnx_matmul
from flashinfer_ondevice.errors import FlashInferError
from flashinfer_ondevice.functional import ACTIVATIONS
from flashinfer_ondevice.quant.codecs import CODECS, codec

INSTALLED = installed_backends()
IDS = [1, *range(5, 45)]


def rows(n: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_t(4, (n, cols)) * 0.02).astype(np.float32)


@pytest.mark.parametrize("backend_name", [b for b in INSTALLED if b != "numpy"])
@pytest.mark.parametrize("codec_name", list(CODECS))
def test_operations_match_the_numpy_decode(backend_name, codec_name):
    backend, c = make_backend(backend_name), codec(codec_name)
    hidden, ffn = 128, 96
    rng = np.random.default_rng(2)
    x = rng.standard_normal(hidden).astype(np.float32)
    xs = rng.standard_normal((5, hidden)).astype(np.float32)
    raw = c.encode(rows(ffn, hidden, 1))
    dense = c.decode_reference(raw, hidden)
    out = np.empty(ffn, np.float32)
    backend.matvec(c, raw, x, out)
    np.testing.assert_allclose(out, dense @ x, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(backend.matmul(c, raw, xs), xs @ dense.T, rtol=1e-4, atol=1e-5)

    parts = [rows(ffn, hidden, seed) for seed in (3, 4, 5)]
    bundles = np.concatenate([c.encode(p) for p in parts], axis=1)
    g, u, d = (c.decode_reference(c.encode(p), hidden) for p in parts)
    act = ACTIVATIONS["gelu_tanh"]
    selected = np.array([0, 5, 17, 40, 95])
    hidden_act = np.empty(len(selected), np.float32)
    ffn_out = np.empty(hidden, np.float32)
    backend.bundle_ffn(c, bundles, selected, x, "gelu_tanh", None, hidden_act, ffn_out)
    expected = act(g[selected] @ x) * (u[selected] @ x)
    np.testing.assert_allclose(hidden_act, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ffn_out, expected @ d[selected], rtol=1e-4, atol=1e-6)
    gates = np.empty(ffn, np.float32)
    backend.gate_activations(c, bundles, x, "gelu_tanh", gates)
    np.testing.assert_allclose(gates, act(g @ x), rtol=1e-4, atol=1e-6)
    full = backend.bundle_ffn_matmul(c, bundles, xs, "gelu_tanh")
    np.testing.assert_allclose(full, (act(xs @ g.T) * (xs @ u.T)) @ d, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend_name", INSTALLED)
@pytest.mark.parametrize("codec_name", list(CODECS))
def test_prepared_matrices_multiply_as_the_codec_decodes(backend_name, codec_name):
    """Where a backend keeps a resident matrix in its own form, the product matches the
    decoded matrix: exactly (float activations, MLX) or within int8 activations' error
    (onnxruntime with accuracy level 4, ~1% of the largest output)."""
    backend, c = make_backend(backend_name), codec(codec_name)
    raw = c.encode(rows(200, 640, 6))
    prepared = backend.prepare(c, raw, 640)
    if prepared is None:
        if backend_name == "cpu":  # onnxruntime takes every codec it maps
            assert codec_name not in onnx_matmul.MAPPED
        assert backend_name == "numpy" or codec_name not in ("int8", "int4", "int4fit")
        return
    x = np.random.default_rng(7).standard_normal((3, 640)).astype(np.float32)
    expected = x @ c.decode_reference(raw, 640).T
    error = np.abs(prepared.apply(x) - expected).max() / np.abs(expected).max()
    assert error < (2e-2 if backend_name == "cpu" else 1e-5)


@pytest.mark.skipif("cpu" not in INSTALLED, reason="onnxruntime is not installed")
def test_dense_ffn_multiplies_by_the_stores_down_rows():
    """Given the store's down projection by row, the cpu backend's dense FFN multiplies by
    those rows (within int8 activations' error), not by the bundles' independently rounded
    columns; rows of the wrong shape are refused."""
    backend, c = make_backend("cpu"), codec("int4")
    hidden, neurons = 128, 192
    gate, up, down = rows(neurons, hidden, 8), rows(neurons, hidden, 9), rows(hidden, neurons, 10)
    bundles = np.concatenate([c.encode(gate), c.encode(up),
                              c.encode_columns(np.ascontiguousarray(down.T))], axis=1)
    down_rows = c.encode(down)
    prepared = backend.prepare_ffn(c, bundles, hidden, "silu", down_rows=down_rows)
    x = np.random.default_rng(11).standard_normal((3, hidden)).astype(np.float32)
    g, u = (c.decode_reference(c.encode(m), hidden) for m in (gate, up))
    h = ACTIVATIONS["silu"](x @ g.T) * (x @ u.T)
    by_rows = h @ c.decode_reference(down_rows, neurons).T
    by_columns = h @ c.decode_reference(bundles[:, 2 * c.row_nbytes(hidden):], hidden)
    out = prepared.apply(x)
    error = np.abs(out - by_rows).max() / np.abs(by_rows).max()
    assert error < 2e-2
    assert error < 0.5 * np.abs(out - by_columns).max() / np.abs(by_columns).max()
    with pytest.raises(ValueError, match="do not fit"):
        backend.prepare_ffn(c, bundles, hidden, "silu", down_rows=down_rows[:, :-4])


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_hf_folder(tmp_path_factory.mktemp("hf") / "gemma3", "gemma3")


@pytest.mark.parametrize("backend_name", [b for b in INSTALLED if b != "numpy"])
@pytest.mark.parametrize("codec_name", ["int8", "int4", "pal4", "bpal4"])
def test_tiny_model_runs_alike_on_every_backend(tiny_folder, backend_name, codec_name):
    """The same store through each backend gives the numpy backend's logits: to float
    rounding when streamed (codec bytes, nothing prepared), within int8
    activations' error with everything resident on the cpu backend (prepared matrices),
    and its down projections' second rounding where the store keeps them by row (int4:
    the bundles' columns and the rows are rounded independently from the source)."""
    reference = fi.load(tiny_folder, codec=codec_name, backend="numpy").logits(IDS)
    scale = np.abs(reference).max()
    streamed = fi.load(tiny_folder, codec=codec_name, backend=backend_name,
                       stream_all=True).logits(IDS)
    assert np.abs(streamed - reference).max() <= 1e-4 * scale
    resident = fi.load(tiny_folder, codec=codec_name, backend=backend_name).logits(IDS)
    by_row = backend_name == "cpu" and codec(codec_name).down_by_row
    assert np.abs(resident - reference).max() <= (1e-1 if by_row else 3e-2) * scale
    assert (resident.argmax(1) == reference.argmax(1)).mean() >= 0.9


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("backend_name", [b for b in INSTALLED if b != "numpy"])
def test_streamed_and_resident_plans_generate_the_same_text(tmp_path, arch, backend_name):
    """Greedy text is the same whether the weights stream (codec bytes) or stay resident
    (prepared in the backend's form), and matches the numpy backend's logits: streamed to
    float rounding, resident within 1e-4 of their range on mlx (float activations) and 5%
    on cpu (int8 activations; random weights amplify them, the real model's cost is in
    docs/benchmarks.md)."""
    folder = write_hf_folder(tmp_path / arch, arch)
    reference = fi.load(folder, backend="numpy").logits(IDS)
    resident = fi.load(folder, backend=backend_name)
    streamed = fi.load(folder, backend=backend_name, stream_all=True)
    scale = np.abs(reference).max()
    assert np.abs(streamed.logits(IDS) - reference).max() <= 1e-4 * scale
    tolerance = 5e-2 if backend_name == "cpu" else 1e-4
    assert np.abs(resident.logits(IDS) - reference).max() <= tolerance * scale
    texts = [m.generate(IDS[:8], max_tokens=12, temperature=0) for m in (resident, streamed)]
    assert texts[0] == texts[1]


def test_backend_choice_errors_name_the_choices(tiny_folder):
    with pytest.raises(FlashInferError, match="unknown backend 'gpu'.*cpu"):
        fi.load(tiny_folder, backend="gpu")
    with pytest.raises(FlashInferError, match="GPU memory budget is for .*mlx.*'cpu'"):
        fi.load(tiny_folder, backend="cpu", gpu_memory_budget="1GB")
    missing = [name for name in BACKENDS if name not in INSTALLED]
    for name in missing:
        with pytest.raises(FlashInferError, match="not installed"):
            make_backend(name)


_THREADS_CHILD = """
import json, sys, warnings
import numba
from threadpoolctl import threadpool_info
import flashinfer_ondevice as fi
from flashinfer_ondevice.backends import onnx_matmul
from flashinfer_ondevice.runtime.stored import PreparedMatrix

def sessions(model):
    weights = model.session.weights
    return [part.session for w in (weights._head_resident, *weights._resident.values())
            if isinstance(w, PreparedMatrix) for part in w.parts]

mixed = sessions(fi.load(sys.argv[1], codec="int8,ffn=pal4", threads=1))
own_pools = [(s.get_session_options().use_per_session_threads,
              s.get_session_options().intra_op_num_threads) for s in mixed]
pool_after_mixed = onnx_matmul._pool_threads
alone = sessions(fi.load(sys.argv[1], codec="int8", threads=1))
numba_threads, blas = numba.get_num_threads(), [p["num_threads"] for p in threadpool_info()]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    fi.load(sys.argv[1], codec="int8", threads=2)
print(json.dumps({"numba": numba_threads, "blas": blas,
                  "sessions": len(alone), "pool": onnx_matmul._pool_threads,
                  "shared": all(not s.get_session_options().use_per_session_threads
                                for s in alone),
                  "own_pools": own_pools, "pool_after_mixed": pool_after_mixed,
                  "warned": [str(w.message) for w in caught]}))
"""


def test_threads_are_honoured_by_every_pool(tiny_folder):
    """-t reaches numba, BLAS and onnxruntime's pools: a model with numba kernels between
    its products (palettized FFNs) gets a sleeping pool per session, an all-prepared one the
    shared pool; a later load in the same process asking other threads is told it runs on
    the shared pool's (a fresh process: the pool is made once per process)."""
    import json
    import subprocess
    import sys

    for spec in ("int8", "int8,ffn=pal4"):  # the stores, converted before the child runs
        fi.load(tiny_folder, codec=spec)
    child = subprocess.run([sys.executable, "-c", _THREADS_CHILD, str(tiny_folder)],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    seen = json.loads(child.stdout.strip().splitlines()[-1])
    assert seen["numba"] == 1 and all(n == 1 for n in seen["blas"])
    assert seen["sessions"], "nothing was prepared: the cpu backend should prepare int8"
    assert seen["own_pools"] and all(p == [True, 1] for p in seen["own_pools"])
    assert seen["pool_after_mixed"] is None
    assert seen["pool"] == 1 and seen["shared"]
    assert any("made for 1 threads" in m and "not on 2" in m for m in seen["warned"])


def test_matrices_prepared_in_chunks_compute_as_one(tiny_folder, monkeypatch):
    """A matrix handed to the backend a few rows at a time (what bounds the output layer's
    load peak) gives the logits of one handed over whole."""
    from flashinfer_ondevice.runtime import stored

    whole = fi.load(tiny_folder, codec="int8")
    monkeypatch.setattr(stored, "PREPARE_CHUNK", 40 * codec("int8").row_nbytes(64))
    chunked = fi.load(tiny_folder, codec="int8")
    assert len(chunked.session.weights._head_resident.parts) > 1
    np.testing.assert_allclose(chunked.logits(IDS), whole.logits(IDS), rtol=1e-5, atol=1e-5)


def test_stacked_qkv_computes_as_three_matrices(tiny_folder, monkeypatch):
    """An all-prepared model multiplies each layer's wq, wk and wv as one stacked matrix
    (one product), with the logits of the three prepared one by one; with anything left to
    compute from codec bytes (here: palettized FFNs) nothing is stacked."""
    from flashinfer_ondevice.runtime.streamed import StreamedWeights

    stacked = fi.load(tiny_folder, codec="int8")
    blocks = list(stacked.session.weights.blocks())
    assert all(b.wqkv is not None and b.wq is None for b in blocks)
    assert stacked.session.weights._all_prepared()
    monkeypatch.setattr(StreamedWeights, "_stack_qkv", lambda self: set())
    separate = fi.load(tiny_folder, codec="int8")
    assert all(b.wqkv is None and b.wq is not None for b in separate.session.weights.blocks())
    np.testing.assert_allclose(stacked.logits(IDS), separate.logits(IDS), rtol=1e-5, atol=1e-5)
    monkeypatch.undo()
    mixed = fi.load(tiny_folder, codec="int8,ffn=pal4")
    assert not mixed.session.weights._all_prepared()
    assert all(b.wqkv is None and b.wq is not None for b in mixed.session.weights.blocks())
