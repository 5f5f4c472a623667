"""A tied embedding split by token into two codecs (store/vocab_tiers.py): convert picks the
hot tokens, the store runs as its decoded weights do at every budget, reads what its plan
says, and a hostile tier record is refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from test_store import IDS, assert_runs_as, decode_logits, decoded_weights, streamed_logits

from flashinfer_ondevice.build import vocab_tiers as build_tiers
from flashinfer_ondevice.build.convert import convert
from flashinfer_ondevice.errors import FlashInferError
from flashinfer_ondevice.quant.codecs import codec, embed_tiers, parse_codec_spec
from flashinfer_ondevice.runtime.head_rows import HeadRows
from flashinfer_ondevice.runtime.planner import make_plan
from flashinfer_ondevice.runtime.store_choice import codecs_of
from flashinfer_ondevice.store import vocab_tiers
from flashinfer_ondevice.store.format import TIERS_VERSION, VERSION
from flashinfer_ondevice.store.reader import StoreError, open_store

SPEC = "int8,embed=int8@100/int4"


@pytest.fixture(scope="module")
def tiered(tiny_gguf, tmp_path_factory):
    return convert(tiny_gguf("gemma3"), tmp_path_factory.mktemp("tiers") / "store", SPEC)


def full_embedding(path) -> np.ndarray:
    """The store's embedding decoded and put back in token order."""
    store = open_store(path)
    rows = []
    for name in ("embed", vocab_tiers.COLD):
        e = store.tensors[name]
        raw = np.fromfile(e.path, np.uint8, e.nbytes, offset=e.offset).reshape(e.rows, -1)
        rows.append(codec(e.codec).decode(raw, e.cols))
    return np.concatenate(rows)[store.vocab_tiers.row_of]


def test_spec_names_the_tiers():
    assert parse_codec_spec("bpal4,embed=bpal4@32768/bpal2")["embed"].name == "bpal4"
    count, cold = embed_tiers("bpal4,embed=bpal4@32768/bpal2", 262144)
    assert (count, cold.name) == (32768, "bpal2")
    assert embed_tiers("bpal4,embed=bpal4@12.5%/bpal2", 262144)[0] == 32768
    assert embed_tiers("bpal4,embed=bpal4@0.001%/bpal2", 1000)[0] == 1  # at least one
    assert embed_tiers("bpal4,embed=bpal3", 262144) is None
    for bad, message in (("int8,embed=int8@0/int4", "at least 1"),
                         ("int8,embed=int8@x/int4", "HOT@N/COLD"),
                         ("int8,embed=int8@100%/int4", "HOT@N/COLD"),
                         ("int8,embed=int8@0%/int4", "HOT@N/COLD"),
                         ("int8,embed=int8@1_0/int4", "HOT@N/COLD"),
                         ("int8,embed=int8@5", "HOT@N/COLD"),
                         ("int8,attn=int8@5/int4", "only the embedding"),
                         ("int8,embed=int8@5/int4,embed=int4", "given twice"),
                         ("int8,embed=int8@5/zip", "unknown codec")):
        with pytest.raises(ValueError, match=message):
            parse_codec_spec(bad)


def test_convert_keeps_the_most_probable_tokens_hot(tiered):
    store = open_store(tiered)
    tiers = store.vocab_tiers
    vocab = store.config.vocab_size
    assert tiers.hot_rows == 100
    assert store.tensors["embed"].rows == 100 and store.tensors["embed"].codec == "int8"
    cold = store.tensors[vocab_tiers.COLD]
    assert cold.rows == vocab - 100 and cold.codec == "int4"
    assert sorted(tiers.order.tolist()) == list(range(vocab))
    hot_ids, cold_ids = tiers.order[:100], tiers.order[100:]
    assert (np.diff(hot_ids) > 0).all() and (np.diff(cold_ids) > 0).all()
    assert tiers.hot[hot_ids].all() and not tiers.hot[cold_ids].any()
    assert (tiers.row_of[tiers.order] == np.arange(vocab)).all()
    assert codecs_of(store) == SPEC
    assert store.head_proxy is None  # the proxy reads one head tensor


def test_hot_tokens_are_the_most_probable():
    probability = np.array([0.1, 0.4, 0.1, 0.3, 0.05, 0.05])
    assert np.flatnonzero(build_tiers.hot_mask(probability, 3)).tolist() == [0, 1, 3]
    rng = np.random.default_rng(0)
    output = rng.standard_normal((50, 8)).astype(np.float32)
    hidden = [rng.standard_normal((7, 8)).astype(np.float32),
              rng.standard_normal((3, 8)).astype(np.float32)]
    norm = np.ones(8, np.float32)
    mean = build_tiers.mean_probabilities(hidden, norm, 1e-6, output)
    x = np.concatenate(hidden)
    x = x / np.sqrt((x ** 2).mean(axis=1, keepdims=True) + 1e-6)
    logits = x @ output.T
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(mean, (p / p.sum(axis=1, keepdims=True)).mean(axis=0),
                               rtol=1e-5)


def test_tiered_store_runs_as_its_decoded_weights(tiered):
    weights = decoded_weights(tiered)  # reads "embed": the hot rows only
    weights.embed = full_embedding(tiered)
    assert_runs_as(tiered, weights)


def test_tiered_store_streams_exactly_and_reads_what_it_plans(tiered):
    store = open_store(tiered)
    head = HeadRows.of(store, "embed")
    resident, _, _, engine = streamed_logits(tiered, None)
    resident_steps = decode_logits(engine, IDS[:8])
    roomy = make_plan(store, 10**12, 64, 0)
    hot_bytes = store.tensors["embed"].nbytes
    crossed = 0
    for room in (0, hot_bytes // 2, hot_bytes + store.tensors[vocab_tiers.COLD].nbytes // 3):
        budget = roomy.fixed_bytes + sum(store.tensors[n].nbytes for n in roomy.resident
                                         if store.tensors[n].codec != "f32") + room
        logits, plan, stats, engine = streamed_logits(tiered, budget, ids=IDS)
        assert plan.head_resident_rows < head.rows
        crossed += plan.head_resident_rows > head.tiers[0].rows
        assert plan.streamed_bytes == sum(
            store.tensors[n].nbytes for n in store.tensors
            if n not in plan.resident and n not in ("embed", vocab_tiers.COLD)) + \
            head.nbytes(plan.head_resident_rows, head.rows)
        assert np.abs(logits - resident).max() <= 1e-5 * np.abs(resident).max()
        np.testing.assert_array_equal(decode_logits(engine, IDS[:8]), resident_steps)
    assert crossed  # one budget kept hot rows and some cold ones


def test_head_rows_split_where_the_tiers_meet(tiered):
    head = HeadRows.of(open_store(tiered), "embed")
    hot, cold = head.tiers
    assert [(e.name, lo, hi) for e, lo, hi in head.parts(90, 110)] == \
        [(hot.name, 90, 100), (cold.name, 0, 10)]
    assert head.nbytes(90, 110) == 10 * hot.row_nbytes + 10 * cold.row_nbytes
    assert head.fitting(90, 10 * hot.row_nbytes + 3 * cold.row_nbytes + 1) == 13
    assert head.fitting(0, hot.row_nbytes - 1) == 0


def _refused(tiered, tmp_path, change) -> str:
    path = tmp_path / "store"
    shutil.copytree(tiered, path)
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError) as info:
        open_store(path)
    return str(info.value)


def _bitmap(manifest, hot: np.ndarray) -> None:
    manifest[vocab_tiers.RECORD] = vocab_tiers.record(hot)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update({vocab_tiers.RECORD: []}), "not a record"),
    (lambda m: m[vocab_tiers.RECORD].update(hot="!!" + m[vocab_tiers.RECORD]["hot"][2:]),
     "not base64"),
    (lambda m: m[vocab_tiers.RECORD].update(hot=m[vocab_tiers.RECORD]["hot"][:-8]),
     "does not hold"),
    (lambda m: _bitmap(m, np.arange(m["config"]["vocab_size"]) < 99), "config implies"),
    (lambda m: _bitmap(m, np.ones(m["config"]["vocab_size"], bool)), "at least one token"),
    (lambda m: m.update(head_proxy={"rank": 16}), "together"),
    (lambda m: m["tensors"].pop(vocab_tiers.COLD), "missing tensors"),
])
def test_hostile_tier_records_are_refused(tiered, tmp_path, change, message):
    assert message in _refused(tiered, tmp_path, change)


def test_tiered_stores_carry_their_own_format_version(tiered, tiny_gguf, tmp_path):
    """A tiered store is version 2, so a runtime reading only version 1 refuses it by its
    version; stores without tiers stay version 1; tiered stores written as version 1 (before
    the version existed) still open."""
    assert json.loads((tiered / "manifest.json").read_text())["version"] == TIERS_VERSION
    plain = convert(tiny_gguf("gemma3"), tmp_path / "plain", "int8")
    assert json.loads((plain / "manifest.json").read_text())["version"] == VERSION
    path = tmp_path / "old"
    shutil.copytree(tiered, path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["version"] = VERSION
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert open_store(path).vocab_tiers.hot_rows == 100


def test_bits_beyond_the_vocabulary_are_refused():
    vocab = 10
    packed = np.packbits(np.ones(16, bool))  # 16 bits for a 10-token vocabulary
    import base64

    raw = {"hot": base64.b64encode(packed.tobytes()).decode()}
    with pytest.raises(ValueError, match="beyond the vocabulary"):
        vocab_tiers.parse(raw, vocab)


def test_tiers_need_a_tied_embedding_and_a_cold_tier(tiny_gguf, tmp_path):
    with pytest.raises(FlashInferError, match="tied embedding"):
        convert(tiny_gguf("llama"), tmp_path / "untied", "int8,embed=int8@10/int4")
    with pytest.raises(FlashInferError, match="fewer than"):
        convert(tiny_gguf("gemma3"), tmp_path / "all-hot", "int8,embed=int8@100000/int4")


def test_prepared_tiers_run_as_the_codec_bytes_do(tiny_gguf, tmp_path):
    """With everything resident the backend prepares each tier in its own form (onnxruntime's
    int4 products, int8 activations); the prompt's rows are read from both tiers."""
    import flashinfer_ondevice as fi

    path = convert(tiny_gguf("gemma3"), tmp_path / "int4", "int4,embed=int4@100/int4")
    exact, _, _, _ = streamed_logits(path, None)
    model = fi.load(path, threads=2)
    try:
        weights = model.weights
        assert weights._embed_scratch is not None  # prepared head: rows read from the store
        prepared = model.logits(IDS)
    finally:
        model.close()
    assert np.abs(prepared - exact).max() <= 0.05 * np.abs(exact).max()
    assert (prepared.argmax(-1) == exact.argmax(-1)).mean() >= 0.9


def test_a_share_and_its_count_name_one_store(tiny_gguf):
    """"@12.5%/" and the count it comes to are one store: converted once, found by both."""
    from flashinfer_ondevice.api import ensure_store, store_path_for
    from flashinfer_ondevice.quant.codecs import with_tier_count

    assert with_tier_count("bpal4,embed=bpal4@12.5%/bpal2,attn=int8", 262144) == \
        "bpal4,embed=bpal4@32768/bpal2,attn=int8"
    assert with_tier_count("bpal4,embed=bpal3", 262144) == "bpal4,embed=bpal3"
    source = tiny_gguf("gemma3")
    vocab = open_store(ensure_store(source, "int8")).config.vocab_size
    share = "int8,embed=int8@25%/int4"
    count = f"int8,embed=int8@{round(vocab / 4)}/int4"
    assert store_path_for(source, share) == store_path_for(source, count)
    path = ensure_store(source, share)
    assert open_store(path).vocab_tiers.hot_rows == round(vocab / 4)
    assert ensure_store(source, count) == path
