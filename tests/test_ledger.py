"""The run-memory ledger: what the planner reserves for each component is what the runtime
allocates, at several budgets and contexts, dense, sparse and with the shortlist head, and a
KV cache past half its context holds what the plan counted (float16, as planned)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from tiny_models import write_hf_folder

from flashinfer_ondevice.build.calibrate import calibrate
from flashinfer_ondevice.build.convert import convert
from flashinfer_ondevice.generate import prefill
from flashinfer_ondevice.model import Transformer
from flashinfer_ondevice.runtime.engine import open_store_session
from flashinfer_ondevice.runtime.planner import BudgetError, SparseSettings, make_plan
from flashinfer_ondevice.runtime.streamed import StreamedWeights
from flashinfer_ondevice.store.io import DirectReader
from flashinfer_ondevice.store.reader import open_store

TEXT = ("The quick brown fox jumps over the lazy dog while the cat sleeps in the sun. " * 40)


@pytest.fixture(scope="module")
def hf_stores(tmp_path_factory):
    """Tiny Hugging Face models as stores (no llama.cpp needed): plain, with an output-layer
    proxy, calibrated for sparsity, and with the embedding in two tiers by token."""
    folder = tmp_path_factory.mktemp("ledger")
    source = write_hf_folder(folder / "hf", "gemma3")
    plain = convert(source, folder / "plain.store", "int8")
    proxy = convert(source, folder / "proxy.store", "int4", head_proxy_rank=64)
    sparse = convert(source, folder / "sparse.store", "int8")
    calibrate(sparse, TEXT, tokens=600)
    tiered = convert(source, folder / "tiered.store", "int8,embed=int8@100/int4")
    return {"plain": plain, "proxy": proxy, "sparse": sparse, "tiered": tiered}


def smallest_budget(store, **settings) -> int:
    try:
        open_store_session(store, memory_budget=1, **settings)
    except BudgetError as error:
        return error.smallest
    raise AssertionError("a 1-byte budget was accepted")


def assert_ledger_matches(session, ctx: int) -> None:
    planned, allocated = session.plan.ledger, session.weights.allocated()
    for component, nbytes in allocated.items():
        assert nbytes == planned[component], (component, nbytes, planned[component])
    cache = session.engine.new_cache(ctx)
    ids = [1, *(5 + np.arange(ctx // 2 + 1) % 200).tolist()]  # past half the context
    prefill(session.engine, ids, cache)
    assert cache.cache_type == "f16"
    assert cache.nbytes() == planned["KV cache"], (cache.nbytes(), planned["KV cache"])


@pytest.mark.parametrize("kind,settings", [
    ("plain", {}), ("plain", {"head": "exact"}), ("proxy", {"head": "shortlist"}),
    ("tiered", {}),
    ("sparse", {"selector": "gate", "sparsity": 0.5}),
    ("sparse", {"selector": "predicted", "sparsity": 0.3}),
])
@pytest.mark.parametrize("ctx", [96, 256])
@pytest.mark.parametrize("extra", [None, 0.0, 0.3, 2.0])
def test_planned_equals_allocated(hf_stores, kind, settings, ctx, extra):
    """extra: None runs unlimited; else the budget is the smallest that works plus this
    fraction of the store's weights (plus 1 MB: the plan counts what the process holds above
    its baseline when it opens the store, measured each time, and that moves by pages)."""
    store = hf_stores[kind]
    budget = None
    if extra is not None:
        weights = (store / "weights.bin").stat().st_size
        budget = smallest_budget(store, ctx_size=ctx, **settings) + int(extra * weights) \
            + (1 << 20)
    session = open_store_session(store, memory_budget=budget, ctx_size=ctx, **settings)
    assert_ledger_matches(session, ctx)
    if budget is not None:
        assert sum(session.plan.ledger.values()) <= budget + session.plan.transient_bytes


GEMMA_CHILD = """
import json, sys
import numpy as np
from flashinfer_ondevice.generate import prefill
from flashinfer_ondevice.model import Transformer
from flashinfer_ondevice.runtime.engine import open_store_session
budget = None if sys.argv[2] == "none" else sys.argv[2]
session = open_store_session(sys.argv[1], memory_budget=budget, ctx_size=1024)
cache = session.engine.new_cache(1024)
prefill(session.engine, [2, *range(1000, 1600)], cache)  # past half of the context
print(json.dumps({"planned": session.plan.ledger, "allocated": session.weights.allocated(),
                  "kv": cache.nbytes(), "type": cache.cache_type}))
"""


@pytest.mark.parametrize("kind,settings", [
    ("sparse", {"selector": "gate", "sparsity": 0.5}), ("proxy", {"head": "shortlist"}),
    ("plain", {"head": "exact"})])
def test_every_budget_from_the_smallest_to_all_fits_runs(hf_stores, kind, settings):
    """A fine sweep of budgets across the range where the ring, the caches and the resident
    rows trade places: each plan builds, runs a token and keeps its ledger."""
    store = hf_stores[kind]
    smallest = smallest_budget(store, ctx_size=96, **settings) + (1 << 20)
    roomy = open_store_session(store, memory_budget=None, ctx_size=96, **settings).plan
    top = smallest + sum(roomy.ledger.values())
    for budget in np.linspace(smallest, top, 23).astype(int).tolist():
        session = open_store_session(store, memory_budget=budget, ctx_size=96, **settings)
        assert_ledger_matches(session, 96)


@pytest.mark.parametrize("kind,sparse,head", [
    ("sparse", SparseSettings("gate", 0.5, 4), "auto"), ("proxy", None, "shortlist"),
    ("plain", None, "exact")])
def test_budgets_where_the_ring_disappears(hf_stores, kind, sparse, head):
    """Around the budget from which no ring is planned (everything that must stream fits
    elsewhere), byte by byte: every plan's ring holds what streams and its ledger holds."""
    store = open_store(hf_stores[kind])

    def plan(budget: int):
        return make_plan(store, budget, 96, 0, sparse=sparse, head=head)

    low, high = plan(10**12).fixed_bytes, 10**9
    while high - low > 1:  # the smallest budget planned without a ring
        middle = (low + high) // 2
        low, high = (middle, high) if plan(middle).buffers else (low, middle)
    reader = DirectReader(store.path / "weights.bin")
    for budget in range(high - 24 * 1024, high + 4096, 512):
        p = plan(budget)
        weights = StreamedWeights(store, p, reader)
        engine = Transformer(store.config, weights)
        prefill(engine, [1, 5, 6], engine.new_cache(8))
        allocated = weights.allocated()
        assert all(allocated[k] == p.ledger[k] for k in allocated), (budget, allocated)
    reader.close()


@pytest.mark.slow
@pytest.mark.parametrize("budget", ["50%", "35%", "none"])
def test_gemma_ledger_at_its_default_context(gemma_store, budget):
    """In a fresh process: the plan's overhead is what this process holds above baseline."""
    child = subprocess.run([sys.executable, "-c", GEMMA_CHILD, str(gemma_store), budget],
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr
    result = json.loads(child.stdout.strip().splitlines()[-1])
    planned = result["planned"]
    for component, nbytes in result["allocated"].items():
        assert nbytes == planned[component], (component, nbytes, planned[component])
    assert result["type"] == "f16" and result["kv"] == planned["KV cache"]
    print(budget, json.dumps(planned))


@pytest.mark.slow
def test_the_output_layer_alone_streams_in_smaller_chunks(gemma_store, monkeypatch):
    """Where every layer is resident and only output-layer rows stream, the ring's buffers
    hold OUTPUT_ONLY_CHUNK bytes of rows instead of OUTPUT_CHUNK: the ring shrinks, and what
    it gave up is resident rows (fewer bytes read per token). Where layers stream too, the
    chunks stay OUTPUT_CHUNK. The streamed weights lay out the units the plan sized."""
    from flashinfer_ondevice.runtime import units
    from flashinfer_ondevice.store.format import ALIGN

    store = open_store(gemma_store)
    layers = [n for n in store.tensors if n.startswith("layers.") and
              store.tensors[n].codec != "f32"]
    head = store.tensors["embed"]
    budget = sum(store.tensors[n].nbytes for n in layers) + head.nbytes // 2
    plan = make_plan(store, budget, 256, 0, head="exact")
    assert plan.buffers and set(layers) <= plan.resident  # only the output layer streams
    assert plan.head_chunk == units.OUTPUT_ONLY_CHUNK
    assert plan.buffer_unit <= units.OUTPUT_ONLY_CHUNK + 2 * ALIGN
    reader = DirectReader(store.path / "weights.bin")
    weights = StreamedWeights(store, plan, reader)
    chunk_rows = units.head_chunk_rows(head, units.OUTPUT_ONLY_CHUNK)
    head_units = [weights._units[i] for i in weights._head_units]
    assert max(sum(p.row_end - p.row_start for p in u.parts) for u in head_units) == chunk_rows
    reader.close()
    monkeypatch.setattr(units, "OUTPUT_ONLY_CHUNK", units.OUTPUT_CHUNK)  # as before
    before = make_plan(store, budget, 256, 0, head="exact")
    assert before.buffer_bytes - plan.buffer_bytes > 2 * units.OUTPUT_ONLY_CHUNK
    assert plan.head_resident_rows > before.head_resident_rows
    assert plan.streamed_bytes < before.streamed_bytes
    monkeypatch.undo()
    less = make_plan(store, budget // 2, 256, 0, head="exact")
    assert not set(layers) <= less.resident and less.head_chunk == units.OUTPUT_CHUNK
