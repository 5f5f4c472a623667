"""Quality measured at convert and the budget's choice between stores of one model: the
record is real (a coarser codec measures worse), the choice follows --quality, the chosen
store fits the budget, stores without a record or with a corrupt one are left out, and
hostile records are refused."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

import flashinfer_ondevice as fi
from flashinfer_ondevice.api import store_path_for, stores_of
from flashinfer_ondevice.build.convert import convert
from flashinfer_ondevice.build.store_quality import QUALITY_CHUNK, held_out_chunks
from flashinfer_ondevice.errors import FlashInferError
from flashinfer_ondevice.runtime import engine, store_choice
from flashinfer_ondevice.runtime.engine import process_baseline
from flashinfer_ondevice.runtime.planner import BudgetError, make_plan
from flashinfer_ondevice.store.reader import StoreError, open_store


def _option(store, read: int, change: float | None, shortlist: bool = False):
    plan = SimpleNamespace(shortlist=16 if shortlist else 0)
    return store_choice.Option(store, plan, read, change)


def test_choice_follows_the_quality_mode():
    asked, small = object(), object()
    mb = 1_000_000
    exact = _option(asked, 90 * mb, 0.001)
    short = _option(asked, 40 * mb, 0.03, shortlist=True)
    fits = _option(small, 0, 0.40)
    found = [exact, short, fits]
    assert store_choice.choose(found, "exact", asked) is exact
    assert store_choice.choose(found, "auto", asked) is short  # within +5%, reads less
    assert store_choice.choose(found, "fastest", asked) is fits
    worse = _option(asked, 40 * mb, 0.08, shortlist=True)  # beyond the tolerance: not auto's
    assert store_choice.choose([exact, worse, fits], "auto", asked) is exact
    # nothing within the tolerance: the least expected change
    assert store_choice.choose([worse, fits], "auto", asked) is worse
    # equal reads, or nearly (a tenth, plus 1 MB): the better quality
    tie = _option(small, 0, 0.10)
    assert store_choice.choose([fits, tie], "fastest", asked) is tie
    near = _option(small, int(0.7 * mb), 0.20)
    assert store_choice.choose([fits, near], "fastest", asked) is near
    far = _option(small, 30 * mb, 0.01)
    assert store_choice.choose([short, far], "fastest", asked) is far  # 30 <= 40 * 1.1 + 1
    assert store_choice.choose([exact, far], "fastest", asked) is far
    assert store_choice.choose([fits, far], "fastest", asked) is fits
    # the asked store unmeasured (older convert): nothing to weigh it against
    blind = [_option(asked, 90 * mb, None), _option(asked, 40 * mb, None, shortlist=True),
             fits]
    assert store_choice.choose(blind, "fastest", asked) is blind[1]
    with pytest.raises(FlashInferError, match="unknown quality"):
        store_choice.choose(found, "best", asked)
    with pytest.raises(FlashInferError, match="every logit exact"):
        store_choice.choose([short], "exact", asked)


class _CharTokenizer:
    bos_id = 1

    def encode(self, text: str, add_special: bool = False) -> list[int]:
        return [ord(c) for c in text]


def test_held_out_chunks_skip_what_calibration_saw():
    text = "".join(chr(65 + i % 26) for i in range(5000))
    chunks = held_out_chunks(_CharTokenizer(), text, after=3000)
    assert [len(c) for c in chunks] == [QUALITY_CHUNK, QUALITY_CHUNK]
    assert all(c[0] == 1 for c in chunks)
    tail = np.concatenate([c[1:] for c in chunks])
    assert np.array_equal(tail, [ord(c) for c in text[-len(tail):]])
    short = held_out_chunks(_CharTokenizer(), text, after=4800)  # 200 left: one short chunk
    assert [len(c) for c in short] == [201]
    assert held_out_chunks(_CharTokenizer(), text, after=4990) == []


@pytest.fixture(scope="module")
def model_stores(tiny_gguf):
    """The tiny Gemma 3 converted into the models folder as int8 and as pal2, with a
    full-rank output-layer proxy (so shortlist options exist)."""
    source = tiny_gguf("gemma3")
    paths = {}
    for spec in ("int8", "pal2"):
        target = store_path_for(source, spec)
        if not target.exists():
            convert(source, target, spec, head_proxy_rank=64)
        paths[spec] = target
    return source, paths


def test_convert_records_quality(model_stores):
    _, paths = model_stores
    int8, pal2 = (open_store(paths[s]).quality for s in ("int8", "pal2"))
    for record in (int8, pal2):
        assert set(record) == {"exact", "shortlist"}
        assert record["exact"].tokens == 2 * (QUALITY_CHUNK // 2 - 1)
    assert int8["exact"].kl < 0.01 and int8["exact"].top1 > 0.95
    assert pal2["exact"].kl > 100 * int8["exact"].kl  # 2 bits per weight cost more
    assert pal2["exact"].top1 < int8["exact"].top1


def _smallest_resident_budget(store) -> int:
    """The least budget under which nothing of `store` streams (bisection)."""
    low, high = 0, 10**9
    while high - low > 1:
        middle = (low + high) // 2
        try:
            fits = make_plan(store, middle, 64, 0, head="exact").streamed_bytes == 0
        except BudgetError:
            fits = False
        low, high = (low, middle) if fits else (middle, high)
    return high


def test_options_and_choice_on_real_stores(model_stores, monkeypatch):
    source, paths = model_stores
    monkeypatch.setattr(store_choice, "SAME_READ_BYTES", 0)  # tiny stores read kilobytes
    assert set(paths.values()) <= set(stores_of(source))
    int8, pal2 = (open_store(paths[s]) for s in ("int8", "pal2"))
    fixed = make_plan(int8, 10**12, 64, 0).fixed_bytes  # int8's smallest workable budget
    budget = max(_smallest_resident_budget(pal2), fixed)
    assert budget < _smallest_resident_budget(int8)  # pal2 fits whole, int8 streams

    def plan(store, head):
        return make_plan(store, budget, 64, 0, head=head, candidates=16)

    found = store_choice.options([int8, pal2], "auto", plan)
    # exact heads for both (the full-rank proxy is larger than the head: no shortlist fits)
    assert {(o.store.path, bool(o.plan.shortlist)) for o in found} == {
        (int8.path, False), (pal2.path, False)}
    by_store = {o.store.path: o for o in found if not o.plan.shortlist}
    assert by_store[pal2.path].read_nbytes == 0 < by_store[int8.path].read_nbytes
    fastest = store_choice.choose(found, "fastest", int8)
    assert fastest.store is pal2 and fastest.read_nbytes == 0
    exact = store_choice.choose(found, "exact", int8)
    assert exact.store is int8 and not exact.plan.shortlist
    assert store_choice.expected_change(pal2, False) > store_choice.expected_change(int8, False)
    with pytest.raises(BudgetError):  # below what any store needs: the smallest is named
        store_choice.options([int8, pal2], "auto",
                             lambda s, h: make_plan(s, fixed // 2, 64, 0, head=h))


def test_load_chooses_between_stores(model_stores, monkeypatch):
    source, paths = model_stores
    plans = []
    # this process's memory above baseline, which budgets count (and which earlier tests
    # raised), held still for the test
    steady = process_baseline() + 5_000_000
    monkeypatch.setattr(engine, "current_rss_bytes", lambda: steady)
    monkeypatch.setattr(store_choice, "SAME_READ_BYTES", 0)  # tiny stores read kilobytes
    with fi.load(source, memory_budget=10**9, quality="fastest") as m:
        assert m.path == paths["int8"]  # both fit: equal reads, the better quality
    with pytest.raises(BudgetError) as refused:
        fi.load(source, memory_budget=1, quality="exact")
    budget = refused.value.smallest + 100_000  # less than int8 needs whole
    with fi.load(source, memory_budget=budget, quality="exact") as m:
        assert m.path == paths["int8"] and m.plan.shortlist == 0
        streamed = m.plan.streamed_bytes
        assert streamed > 0
    with fi.load(source, memory_budget=budget, quality="fastest", on_plan=plans.append) as m:
        assert m.path == paths["pal2"]  # fewer bytes to stream, or none
        assert m.plan.streamed_bytes < streamed and m.plan.budget == budget
        assert "quality fastest" in plans[-1] and "also possible: int8 store" in plans[-1]
        m.generate("abc", max_tokens=4, temperature=0)
    with pytest.raises(FlashInferError, match="unknown quality"):
        fi.load(source, memory_budget=budget, quality="best")
    with pytest.raises(FlashInferError, match="leave out --head shortlist"):
        fi.load(source, memory_budget=budget, quality="exact", head="shortlist")


def _copy_with(path, tmp_path, name, edit):
    copy = tmp_path / name
    shutil.copytree(path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_unweighable_stores_are_not_chosen(model_stores, tmp_path, monkeypatch):
    _, paths = model_stores
    monkeypatch.setattr(engine, "current_rss_bytes", lambda: process_baseline() + 5_000_000)
    budget = engine.open_store_session(paths["int8"], 1 << 30).plan.fixed_bytes + 100_000
    plans = []
    old = _copy_with(paths["int8"], tmp_path, "old.store", lambda m: m.pop("quality"))
    session = engine.open_store_session(old, budget, quality="fastest", on_plan=plans.append,
                                        alternatives=[paths["pal2"]])
    assert session.path == old and "quality" not in plans[-1]  # runs as planned, no choice
    session.close()
    broken = _copy_with(paths["pal2"], tmp_path, "broken.store",
                        lambda m: m["quality"]["exact"].update(kl=float("nan")))
    unmeasured = _copy_with(paths["pal2"], tmp_path, "unmeasured.store",
                            lambda m: m.pop("quality"))
    session = engine.open_store_session(paths["int8"], budget, quality="fastest",
                                        alternatives=[broken, unmeasured])
    assert session.path == paths["int8"]  # neither sibling can be weighed
    session.close()


@pytest.mark.parametrize("edit, message", [
    (lambda q: q.pop("exact"), "quality record is malformed"),
    (lambda q: q["exact"].update(kl=-1.0), "out of range"),
    (lambda q: q["exact"].update(top1="high"), "not finite"),
    (lambda q: q["exact"].update(extra=1), "'exact' is malformed"),
    (lambda q: q.update(other={}), "quality record is malformed"),
    (lambda q: q["exact"].update(kl=float("nan")), "not finite"),
    (lambda q: q["exact"].update(nll_delta=float("inf")), "not finite"),
    (lambda q: q["exact"].update(tokens=float("inf")), "not finite"),
    (lambda q: q["exact"].update(tokens=10**30), "out of range"),
    (lambda q: q["exact"].update(kl="0.1"), "not finite"),
    (lambda q: q["exact"].update(tokens=True), "not finite"),
])
def test_corrupt_quality_record_is_refused(model_stores, tmp_path, edit, message):
    broken = tmp_path / "broken.store"
    shutil.copytree(model_stores[1]["int8"], broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    edit(manifest["quality"])
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=message):
        open_store(broken)
