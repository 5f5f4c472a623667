"""The output layer's shortlist plan: proxy fitted at convert, candidates computed exactly,
only their rows read, the planner's choice, corrupt proxies refused, and quality on the real
Gemma 3 270M against the exact output layer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from flashinfer_ondevice.build.convert import convert
from flashinfer_ondevice.errors import FlashInferError
from flashinfer_ondevice.generate import prefill
from flashinfer_ondevice.model import Transformer
from flashinfer_ondevice.runtime.planner import make_plan
from flashinfer_ondevice.runtime.shortlist_head import ShortlistHead
from flashinfer_ondevice.runtime.streamed import StreamedWeights
from flashinfer_ondevice.store.head_proxy import FILE
from flashinfer_ondevice.store.io import DirectReader
from flashinfer_ondevice.store.reader import StoreError, open_store

IDS = [1, *range(20, 60)]
CANDIDATES = 16


@pytest.fixture(scope="module")
def proxy_store(tiny_gguf, tmp_path_factory):
    """Tiny Gemma 3 (tied embeddings, hidden 64) with a full-rank proxy: its ranking is the
    exact one up to int8 rounding, so the true top token is always a candidate."""
    return convert(tiny_gguf("gemma3"), tmp_path_factory.mktemp("proxy") / "g.store",
                   head_proxy_rank=64)


def run(path, head: str, budget: int | None = None, ids=IDS):
    store = open_store(path)
    plan = make_plan(store, budget, ctx=64, overhead=0, head=head, candidates=CANDIDATES)
    reader = DirectReader(path / "weights.bin")
    engine = Transformer(store.config, StreamedWeights(store, plan, reader))
    logits = prefill(engine, ids, engine.new_cache(len(ids)), all_logits=True)
    return logits, plan, reader, engine


def test_candidates_get_exact_logits(proxy_store):
    exact, _, _, _ = run(proxy_store, "exact")
    short, plan, _, engine = run(proxy_store, "shortlist")
    assert plan.shortlist == CANDIDATES and isinstance(engine.weights.lm_head, ShortlistHead)
    assert np.array_equal(short.argmax(1), exact.argmax(1))
    for row_short, row_exact in zip(short, exact, strict=True):
        best = np.argsort(row_exact)[-3:]  # the exact top 3 are candidates, computed exactly
        np.testing.assert_allclose(row_short[best], row_exact[best], rtol=1e-5, atol=1e-5)
    assert not np.array_equal(short, exact)  # the others keep proxy scores


def test_only_candidate_rows_are_read(proxy_store):
    store = open_store(proxy_store)
    head = store.tensors["embed"]
    budget = make_plan(store, 10**12, 64, 0, head="shortlist",
                       candidates=CANDIDATES).fixed_bytes + 20_000
    _, plan, reader, engine = run(proxy_store, "shortlist", budget, ids=[1])
    assert plan.head_resident_rows < head.rows
    before = reader.stats.snapshot()
    engine.forward(np.array([30]), engine.new_cache(4))
    read = reader.stats.since(before).bytes_read
    # the input row and at most CANDIDATES output rows, each within two pages
    assert 0 < read <= plan.streamed_bytes + (CANDIDATES + 1) * 2 * 4096


def test_planner_picks_the_shortlist_only_when_the_head_does_not_fit(proxy_store, tiny_gguf,
                                                                     tmp_path, gemma_store):
    gemma = open_store(gemma_store)
    assert make_plan(gemma, None, 256, 0).shortlist == 0  # everything fits: exact
    half = gemma.nbytes // 2
    plan = make_plan(gemma, half, 256, 0)
    assert plan.shortlist > 0 and plan.ring_scratch  # candidates read via the I/O ring
    assert make_plan(gemma, half, 256, 0, head="exact").shortlist == 0
    # where the proxy itself does not fit but the exact plan does, the exact plan
    store = open_store(proxy_store)
    small = make_plan(store, 10**12, 64, 0).fixed_bytes
    assert make_plan(store, small, 64, 0, candidates=CANDIDATES).shortlist == 0
    plain = open_store(convert(tiny_gguf("gemma3"), tmp_path / "plain"))
    assert plain.head_proxy is None  # hidden 64: no proxy by the default rule
    with pytest.raises(FlashInferError, match="no output-layer proxy"):
        make_plan(plain, small, 64, 0, head="shortlist")


def _corrupt(store: Path, tmp_path: Path, edit) -> str:
    broken = tmp_path / "broken.store"
    shutil.copytree(store, broken)
    edit(broken)
    with pytest.raises(StoreError) as info:
        open_store(broken)
    return str(info.value)


def _manifest(edit):
    def apply(path: Path):
        manifest = json.loads((path / "manifest.json").read_text())
        edit(manifest)
        (path / "manifest.json").write_text(json.dumps(manifest))
    return apply


@pytest.mark.parametrize("edit, message", [
    (_manifest(lambda m: m["head_proxy"].update(rank=65)), "proxy rank 65 is invalid"),
    (_manifest(lambda m: m["head_proxy"].update(rank=10**9)), "proxy rank"),
    (_manifest(lambda m: m["tensors"].pop("head_proxy.scores")), "proxy tensors are missing"),
    (_manifest(lambda m: m["tensors"]["head_proxy.residual"].update(rows=63)), "config implies"),
    (_manifest(lambda m: m["tensors"]["head_proxy.scores"].update(offset=1 << 40)),
     "outside its file"),
    (_manifest(lambda m: m["tensors"]["head_proxy.basis"].update(file="../weights.bin")),
     "unlisted file"),
    (lambda p: (p / FILE).write_bytes((p / FILE).read_bytes()[:-4096]), f"{FILE} has"),
])
def test_corrupt_proxy_is_refused(proxy_store, tmp_path, edit, message):
    assert message in _corrupt(proxy_store, tmp_path, edit)


def test_gemma_shortlist_quality(gemma_store):
    """On held-out text, the shortlist's next token agrees with the exact output layer's
    (measured 99.8% over 512 tokens, docs/benchmarks.md) and its candidates are exact."""
    import flashinfer_ondevice as fi

    text = (Path(__file__).resolve().parents[1] / "data/eval/apache-2.0.txt").read_text()
    # under a budget both compute from the codec bytes (nothing prepared, float
    # activations), so the difference is the shortlist's; the budget is generous because
    # the planner counts this test session's growth (and the first model) as overhead
    exact_model = fi.load(gemma_store, head="exact", threads=2, memory_budget="4GB")
    ids = exact_model.tokenize(text)[:192]
    exact = exact_model.logits(ids)
    short = fi.load(gemma_store, head="shortlist", threads=2, memory_budget="4GB").logits(ids)
    agree = np.mean(short.argmax(1) == exact.argmax(1))
    assert agree >= 0.97, agree
    top = exact.argmax(1)
    rows = np.arange(len(ids))
    hit = short.argmax(1) == top
    np.testing.assert_allclose(short[rows[hit], top[hit]], exact[rows[hit], top[hit]],
                               rtol=1e-4, atol=1e-3)
