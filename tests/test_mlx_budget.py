"""The mlx backend under a memory budget, and its device tier (--gpu-memory-budget): tiny
models through mlx give the numpy backend's logits at every split between device, DRAM and
flash, and the same greedy tokens; the plan puts the expected bytes in each tier; the ledger
equals what is allocated (MLX's own count of its arrays included); bad values are refused in
one line. Runs wherever MLX imports (mlx[cpu] here: the device form then lives in DRAM)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import numpy as np
import pytest
from tiny_models import write_hf_folder

import flashinfer_ondevice as fi
from flashinfer_ondevice.api import plan as api_plan
from flashinfer_ondevice.backends import installed_backends, make_backend
from flashinfer_ondevice.backends.mlx_backend import MlxBackend
from flashinfer_ondevice.build.convert import convert
from flashinfer_ondevice.errors import FlashInferError
from flashinfer_ondevice.generate import prefill
from flashinfer_ondevice.model import Transformer
from flashinfer_ondevice.quant.codecs import codec
from flashinfer_ondevice.runtime.planner import BudgetError, make_plan
from flashinfer_ondevice.runtime.streamed import StreamedWeights
from flashinfer_ondevice.schema import LAYER_MATRICES, layer_key
from flashinfer_ondevice.store.io import DirectReader
from flashinfer_ondevice.store.reader import open_store

pytestmark = pytest.mark.skipif("mlx" not in installed_backends(), reason="mlx not installed")

IDS = [1, *range(5, 45)]
CTX = 64


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Tiny models as stores, converted once per (architecture, codec)."""
    folder = tmp_path_factory.mktemp("mlx_budget")
    made = {}

    def get(arch: str, codec_name: str):
        if (arch, codec_name) not in made:
            source = folder / arch
            if not source.exists():
                write_hf_folder(source, arch)
            made[arch, codec_name] = convert(source, folder / f"{arch}-{codec_name}.store",
                                             codec_name)
        return open_store(made[arch, codec_name])
    return get


def run(store, plan, backend):
    """Weights and engine under `plan` on `backend`: (prefill logits, greedy tokens, weights)."""
    reader = DirectReader(store.path / "weights.bin")
    weights = StreamedWeights(store, plan, reader, backend)
    engine = Transformer(store.config, weights, backend=backend)
    logits = prefill(engine, IDS, engine.new_cache(len(IDS)), all_logits=True)
    cache = engine.new_cache(CTX)
    step = prefill(engine, IDS[:8], cache)
    tokens = []
    for _ in range(12):
        tokens.append(int(np.argmax(step[-1])))
        step = engine.forward(np.array(tokens[-1:]), cache)
    weights.close()
    return logits, tokens, weights


def smallest(store, backend) -> int:
    """The smallest budget the planner accepts for `store` on `backend`."""
    try:
        make_plan(store, 1, CTX, 0, backend=backend)
    except BudgetError as error:
        return error.smallest
    raise AssertionError("a 1-byte budget was accepted")


def head_device_row(store) -> int:
    """Bytes of one output-layer row in MLX's form."""
    e = store.tensors["embed"]
    return MlxBackend().device_nbytes(codec(e.codec), 1, e.cols)


def device_nbytes(store, name: str) -> int:
    e, backend = store.tensors[name], MlxBackend()
    if name.endswith(".ffn"):
        return backend.ffn_device_nbytes(codec(e.codec), e.rows, e.cols)
    return backend.device_nbytes(codec(e.codec), e.rows, e.cols)


@pytest.mark.parametrize("arch,codec_name", [("gemma3", "int8"), ("llama", "int4"),
                                             ("qwen2", "pal4")])
def test_every_split_gives_the_numpy_logits_and_the_same_text(stores, arch, codec_name):
    """Budgets from the smallest to all resident, and every weight streamed, each without
    and with half the weights or all that fit on the device (then output-layer rows too):
    logits within 1e-4 of the numpy backend's range (as the other mlx tests), greedy tokens
    those of the fully resident run."""
    store = open_store(stores(arch, codec_name).path)
    reference, _, _ = run(store, make_plan(store, None, CTX, 0), make_backend("numpy"))
    scale = np.abs(reference).max()
    mlx = MlxBackend()
    _, resident_tokens, _ = run(store, make_plan(store, None, CTX, 0, backend=mlx), mlx)
    weights = sum(e.nbytes for e in store.tensors.values())
    low = smallest(store, mlx)
    cases = [(low + int(f * weights), False) for f in (0.0, 0.5, 1.0)] + [(low, True)]
    for budget, stream_all in cases:
        for device_budget in (None, weights // 2, 10**12):
            backend = MlxBackend()
            plan = make_plan(store, budget, CTX, 0, stream_all=stream_all, backend=backend,
                             device_budget=device_budget)
            assert plan.streamed_bytes > 0 or not stream_all
            logits, tokens, _ = run(store, plan, backend)
            assert np.abs(logits - reference).max() <= 1e-4 * scale, (budget, device_budget)
            assert tokens == resident_tokens, (budget, device_budget)


def test_the_device_budget_places_the_expected_bytes(stores):
    """Without a DRAM budget: a device budget of exactly the attention matrices' device bytes
    puts them there (attention is placed before FFNs) and the rest in DRAM; a larger one
    every matrix; one byte none. The text is the same whatever the split."""
    store = stores("gemma3", "int8")
    n_layers = store.config.n_layers
    attention = {layer_key(i, f) for i in range(n_layers) for f in LAYER_MATRICES}
    ffns = {layer_key(i, "ffn") for i in range(n_layers)}
    weights = {n for n, e in store.tensors.items() if e.codec != "f32"} - {"embed"}
    attention_bytes = sum(device_nbytes(store, n) for n in attention)
    everything = attention_bytes + sum(device_nbytes(store, n) for n in ffns)
    head_entry = store.tensors["embed"]
    per_row = head_device_row(store)
    texts = set()
    for device_budget, on_device in ((1, set()), (attention_bytes, attention),
                                     (attention_bytes + 1, attention),
                                     (everything, attention | ffns),
                                     (everything + 20 * per_row + 1, attention | ffns),
                                     (10**12, attention | ffns)):
        backend = MlxBackend()
        plan = make_plan(store, None, CTX, 0, backend=backend, device_budget=device_budget)
        assert plan.device == on_device
        layers = sum(device_nbytes(store, n) for n in on_device)
        head_rows = min(head_entry.rows, (device_budget - layers) // per_row)  # then the head
        assert plan.head_device_rows == head_rows
        assert plan.device_bytes == layers + head_rows * per_row
        in_dram = weights - on_device
        head = (plan.head_resident_rows - head_rows) * head_entry.row_nbytes
        vectors = sum(e.nbytes for e in store.tensors.values() if e.codec == "f32")
        assert plan.weight_bytes == sum(store.tensors[n].nbytes for n in in_dram) + head \
            + vectors
        assert plan.streamed_bytes == 0
        assert "device" in plan.describe(store).splitlines()[1]
        texts.add(tuple(run(store, plan, backend)[1]))
    assert len(texts) == 1


@pytest.mark.parametrize("arch,codec_name", [("gemma3", "int8"), ("llama", "int4")])
def test_output_layer_rows_on_the_device(stores, arch, codec_name):
    """The output layer goes to the device tier after every layer, its first rows (tied
    embeddings: the prompt's tokens below 20 are looked up from the store, the others from
    the rows kept in DRAM): logits those of the numpy backend, with and without a DRAM budget
    (which the device rows count in where they are the process's memory)."""
    store = open_store(stores(arch, codec_name).path)
    reference, resident_tokens, _ = run(store, make_plan(store, None, CTX, 0),
                                        make_backend("numpy"))
    scale = np.abs(reference).max()
    layers = sum(device_nbytes(store, n) for n, e in store.tensors.items()
                 if e.codec != "f32" and n not in ("embed", "output"))
    head = store.tensors["output" if "output" in store.tensors else "embed"]
    per_row = MlxBackend().device_nbytes(codec(head.codec), 1, head.cols)
    for budget in (None, 10**9):
        backend = MlxBackend()
        plan = make_plan(store, budget, CTX, 0, backend=backend,
                         device_budget=layers + 20 * per_row)
        assert plan.head_device_rows == 20
        assert plan.head_resident_rows == head.rows
        assert "the first 20 in the device form" in plan.describe(store)
        logits, tokens, _ = run(store, plan, backend)
        assert np.abs(logits - reference).max() <= 1e-4 * scale, budget
        assert tokens == resident_tokens, budget


def test_plan_api_places_the_device_tier(tiny_folder):
    """api.plan() plans for the backend asked, with its device budget (and refuses one for a
    backend without a device tier)."""
    planned = api_plan(tiny_folder, backend="mlx", gpu_memory_budget="100%")
    assert planned.plan.device and planned.plan.head_device_rows
    assert not api_plan(tiny_folder).plan.device
    with pytest.raises(FlashInferError, match="not 'cpu'"):
        api_plan(tiny_folder, gpu_memory_budget="50%")


def test_a_device_in_host_memory_counts_in_the_memory_budget(stores, monkeypatch):
    """Under a budget that holds the fixed memory and little more: where the device form is
    the process's memory (MLX's CPU device, Apple silicon) it takes DRAM room, and streams
    what does not fit; on a GPU of its own (CUDA) the device budget alone limits it."""
    store = stores("gemma3", "int8")
    backend = MlxBackend()
    tight = make_plan(store, 10**12, CTX, 0, backend=backend).fixed_bytes
    shared = make_plan(store, tight, CTX, 0, backend=backend, device_budget=10**9)
    assert shared.streamed_bytes > 0
    assert shared.device_bytes + shared.weight_bytes <= shared.budget - shared.fixed_bytes \
        + sum(e.nbytes for e in store.tensors.values() if e.codec == "f32")
    monkeypatch.setattr(MlxBackend, "device_shares_host", property(lambda self: False))
    apart = make_plan(store, tight, CTX, 0, backend=backend, device_budget=10**9)
    assert apart.device_bytes > shared.device_bytes
    assert len(apart.device) == 5 * store.config.n_layers  # every matrix but the output layer
    assert "device memory" in apart.describe(store)


@pytest.mark.parametrize("device_budget", [None, 1, 60_000, 10**12])
@pytest.mark.parametrize("fraction", [None, 0.0, 0.5])
def test_ledger_equals_allocation(stores, device_budget, fraction):
    """Each component the runtime holds is what the plan counted, and MLX's own count of
    its arrays grows by exactly the device weights and the staging."""
    store = stores("gemma3", "int4")
    backend = MlxBackend()
    budget = None if fraction is None else smallest(store, backend) + int(
        fraction * sum(e.nbytes for e in store.tensors.values()))
    plan = make_plan(store, budget, CTX, 0, backend=backend, device_budget=device_budget)
    import mlx.core as mx
    gc.collect()
    before = mx.get_active_memory()
    reader = DirectReader(store.path / "weights.bin")
    weights = StreamedWeights(store, plan, reader, backend)
    allocated = weights.allocated()
    assert mx.get_active_memory() - before == plan.device_bytes + plan.staging_bytes
    assert plan.staging_bytes > 0
    for component, nbytes in allocated.items():
        assert nbytes == plan.ledger[component], (component, nbytes, plan.ledger[component])
    engine = Transformer(store.config, weights, backend=backend)
    prefill(engine, IDS, engine.new_cache(CTX))
    assert mx.get_active_memory() - before == plan.device_bytes + plan.staging_bytes
    weights.close()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_hf_folder(tmp_path_factory.mktemp("hf") / "gemma3", "gemma3")


@pytest.mark.parametrize("value,message", [
    ("lots", "invalid GPU memory budget 'lots'"), (-5, "GPU memory budget=-5.0 is out of range"),
    (float("nan"), "GPU memory budget=nan is out of range"), ("0%", "out of range"),
    (True, "invalid GPU memory budget True"), ("9000000GB", "out of range")])
def test_bad_device_budgets_are_refused_in_one_line(tiny_folder, value, message):
    with pytest.raises(FlashInferError, match=message) as error:
        fi.load(tiny_folder, backend="mlx", gpu_memory_budget=value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("backend", ["cpu", "numpy", "reference"])
def test_a_device_budget_needs_a_backend_with_a_device(tiny_folder, backend):
    with pytest.raises(FlashInferError, match=f"GPU memory budget is for .*mlx.*'{backend}'"):
        fi.load(tiny_folder, backend=backend, gpu_memory_budget="1GB")


def run_model(models: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLASHINFER_MODELS_DIR": models}
    return subprocess.run([sys.executable, "-m", "flashinfer_ondevice.cli", *args],
                          capture_output=True, text=True, timeout=300, env=env)


def test_cli_prints_the_three_tiers_and_refuses_bad_values(tiny_folder, tmp_path):
    """run-model with --backend mlx under both budgets prints the device tier and the same
    text as without them; bad values are one-line errors."""
    common = ("-m", str(tiny_folder), "-p", "ab", "-n", "6", "--temp", "0", "-c", "64",
              "--backend", "mlx")
    tiered = run_model(str(tmp_path), *common, "--memory-budget", "60MB",
                       "--gpu-memory-budget", "100KB")
    assert tiered.returncode == 0, tiered.stderr
    assert "\n  device " in tiered.stderr and "streamed per token" in tiered.stderr
    plain = run_model(str(tmp_path), *common)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == tiered.stdout
    for args, message in ((("--gpu-memory-budget", "plenty"), "invalid GPU memory budget"),
                          (("--backend", "cpu", "--gpu-memory-budget", "1GB"),
                           "GPU memory budget is for")):
        bad = run_model(str(tmp_path), *common, *args)
        assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr
        assert message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
