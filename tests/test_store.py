"""Flash store: round trips, exactness of streaming at any budget, bytes actually read,
and clear errors on corrupt, truncated or hostile stores."""

from __future__ import annotations

import copy
import itertools
import json
import shutil

import numpy as np
import pytest

import flashinfer_ondevice as fi
from flashinfer_ondevice.build.convert import convert
from flashinfer_ondevice.errors import FlashInferError
from flashinfer_ondevice.generate import prefill
from flashinfer_ondevice.loader import load_checkpoint
from flashinfer_ondevice.memory import aligned_buffer
from flashinfer_ondevice.model import Transformer, reference_engine
from flashinfer_ondevice.quant.codecs import CODECS, codec
from flashinfer_ondevice.runtime.planner import BudgetError, make_plan, parse_budget
from flashinfer_ondevice.runtime.streamed import StreamedWeights
from flashinfer_ondevice.schema import layer_key
from flashinfer_ondevice.store.io import DirectReader
from flashinfer_ondevice.store.reader import StoreError, open_store
from flashinfer_ondevice.weights import LayerWeights, Weights

IDS = [1, *range(20, 60)]


@pytest.fixture(scope="module")
def stores(tiny_gguf, tmp_path_factory):
    folder = tmp_path_factory.mktemp("stores")
    cache = {}

    def get(arch: str, codec_name: str = "int8"):
        if (arch, codec_name) not in cache:
            cache[arch, codec_name] = convert(tiny_gguf(arch), folder / f"{arch}.{codec_name}",
                                              codec_name)
        return cache[arch, codec_name]

    return get


def streamed_logits(path, budget: int | None, ids=IDS, stream_all: bool = False):
    store = open_store(path)
    plan = make_plan(store, budget, ctx=64, overhead=0, stream_all=stream_all)
    reader = DirectReader(path / "weights.bin")
    engine = Transformer(store.config, StreamedWeights(store, plan, reader))
    before = reader.stats.snapshot()
    logits = prefill(engine, ids, engine.new_cache(len(ids)), all_logits=True)
    return logits, plan, reader.stats.since(before), engine


def decoded_weights(path) -> Weights:
    """Every tensor of a store decoded to float32, for the numpy reference engine."""
    store = open_store(path)
    def read(name):
        e = store.tensors[name]
        raw = np.fromfile(e.path, np.uint8, e.nbytes, offset=e.offset).reshape(e.rows, -1)
        if e.codec == "f32":
            return raw.view(np.float32).reshape(-1)
        if name.endswith(".ffn"):
            c = codec(e.codec)
            rb = c.row_nbytes(e.cols)
            return [c.decode(raw[:, k * rb:(k + 1) * rb], e.cols) for k in range(3)]
        return codec(e.codec).decode(raw, e.cols)
    cfg = store.config
    layers = []
    for i in range(cfg.n_layers):
        gate, up, down = read(f"layers.{i}.ffn")
        fields = {f: read(f"layers.{i}.{f}") for f in ("wq", "wk", "wv", "wo", "attn_norm",
                                                        "ffn_norm")}
        for f in ("bq", "bk", "bv", "q_norm", "k_norm", "post_attn_norm", "post_ffn_norm"):
            if f"layers.{i}.{f}" in store.tensors:
                fields[f] = read(f"layers.{i}.{f}")
        layers.append(LayerWeights(w_gate=gate, w_up=up, w_down=np.ascontiguousarray(down.T),
                                   **fields))
    return Weights(embed=read("embed"), layers=layers, final_norm=read("final_norm"),
                   output=read("output") if "output" in store.tensors else None)


def decode_logits(engine, ids):
    cache = engine.new_cache(len(ids))
    return np.concatenate([engine.forward(np.array([t]), cache) for t in ids])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("codec_name", list(CODECS))
def test_streaming_is_exact_at_every_budget(stores, arch, codec_name):
    """Decode (one token at a time, per-row kernels): bitwise identical to fully resident.
    Prefill (BLAS on decoded row blocks, whose blocking depends on where a streamed chunk
    starts): identical up to float rounding, <= 1e-5 of the largest logit."""
    path = stores(arch, codec_name)
    resident, full_plan, _, engine = streamed_logits(path, None)
    resident_steps = decode_logits(engine, IDS[:16])
    assert full_plan.streamed_bytes == 0
    roomy = make_plan(open_store(path), 10**12, 64, 0)
    # budgets between the smallest workable and "all fits" (tiny models: two ring buffers
    # hold most of the model, so that range is narrow, for llama and qwen2 empty), and a
    # plan that streams everything
    streamable = roomy.resident_bytes - 2 * roomy.buffer_unit
    cases = [(roomy.fixed_bytes + int(f * streamable), False) for f in (0.0, 0.3, 0.6)]
    streaming = 0
    for budget, stream_all in [*cases, (roomy.fixed_bytes, True)]:
        logits, plan, _, engine = streamed_logits(path, budget, stream_all=stream_all)
        if plan.streamed_bytes == 0:
            assert plan.buffers == 0 and not stream_all  # everything fits: nothing to test
            continue
        streaming += 1
        assert np.abs(logits - resident).max() <= 1e-5 * np.abs(resident).max()
        if codec(codec_name).fused:  # f16 has no fused kernel: it decodes and uses BLAS
            np.testing.assert_array_equal(decode_logits(engine, IDS[:16]), resident_steps)
    assert streaming >= (4 if arch == "gemma3" else 1)


@pytest.mark.parametrize(("arch", "codec_name"), [("llama", "int8"), ("gemma3", "int8"),
                                                  ("gemma3", "pal3")])
def test_store_matches_reference_engine_on_the_same_codec(stores, arch, codec_name):
    path = stores(arch, codec_name)
    assert_runs_as(path, decoded_weights(path))


def assert_runs_as(path, weights: Weights) -> None:
    """The store at `path` computes what the numpy reference engine does on `weights` (its
    tensors decoded)."""
    reference = reference_engine(open_store(path).config, weights)
    reference.cache_type = "f16"  # the store engine's KV cache rounding
    expected = reference.forward(np.array(IDS), reference.new_cache(64), all_logits=True)
    ours, _, _, engine = streamed_logits(path, None)
    # float rounding only: BLAS on decoded rows vs the same rows (prefill)
    assert np.abs(ours - expected).max() <= 1e-4 * np.abs(expected).max()
    # decode steps use the fused kernels; they agree with batch prefill to float rounding
    steps = decode_logits(engine, IDS[:12])
    assert np.abs(steps - expected[:12]).max() <= 1e-3 * np.abs(expected).max()


def test_bytes_read_per_pass_is_what_the_plan_streams(stores):
    path = stores("gemma3", "int8")
    store = open_store(path)
    budget = make_plan(store, 10**12, 64, 0).fixed_bytes + sum(
        e.nbytes for e in store.tensors.values()) // 3
    _, plan, first, engine = streamed_logits(path, budget, ids=[1])
    reader = engine.weights.reader
    before = reader.stats.snapshot()
    engine.forward(np.array([5]), engine.new_cache(8))
    per_pass = reader.stats.since(before).bytes_read
    # streamed tensors are read whole (aligned to 4 KiB each) plus one embedding row
    slack = 4096 * (2 * len(store.tensors) + 2)
    assert plan.streamed_bytes <= per_pass <= plan.streamed_bytes + slack
    assert reader.direct


def test_budget_parsing_and_refusal(stores):
    assert parse_budget("50%", 1000) == 500
    assert parse_budget("120MB", 0) == 120_000_000
    assert parse_budget("1.5GB", 0) == 1_500_000_000
    assert parse_budget("512MiB", 0) == 512 << 20
    assert parse_budget(12345, 0) == 12345
    for bad in ("lots", "-5MB", "5 parsecs", ""):
        with pytest.raises(FlashInferError, match="invalid memory budget"):
            parse_budget(bad, 1000)
    with pytest.raises(BudgetError, match="smallest that works .* is"):
        make_plan(open_store(stores("llama")), 1_000_000, 64, 0)


def test_interrupted_convert_leaves_nothing(tiny_gguf, tmp_path, monkeypatch):
    from flashinfer_ondevice.build import convert as convert_module

    calls = {"n": 0}
    original = convert_module._WeightsWriter.put

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(convert_module._WeightsWriter, "put", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_gguf("llama"), tmp_path / "store", "int8")
    assert list(tmp_path.iterdir()) == []


def _corrupt(stores, tmp_path, edit) -> str:
    path = tmp_path / "store"
    shutil.copytree(stores("llama"), path)
    edit(path)
    with pytest.raises(StoreError) as info:
        open_store(path, verify=True)
    return str(info.value)


def _edit_manifest(change):
    def edit(path):
        manifest = json.loads((path / "manifest.json").read_text())
        change(manifest)
        (path / "manifest.json").write_text(json.dumps(manifest))
    return edit


@pytest.mark.parametrize("edit, message", [
    (lambda p: (p / "manifest.json").unlink(), "not a flash store"),
    (lambda p: (p / "manifest.json").write_text("{not json"), "not valid JSON"),
    (lambda p: (p / "weights.bin").write_bytes((p / "weights.bin").read_bytes()[:-8192]),
     "weights.bin has"),
    (_edit_manifest(lambda m: m.update(version=99)), "format version 99"),
    (_edit_manifest(lambda m: m.update(codec="zip")), "unknown codec"),
    (_edit_manifest(lambda m: m["files"].update({"../../etc/passwd": {"size": 1}})),
     "not a plain name"),
    (_edit_manifest(lambda m: m["tensors"]["embed"].update(offset=1 << 40)), "outside its file"),
    (_edit_manifest(lambda m: m["tensors"]["embed"].update(offset=100)), "aligned"),
    (_edit_manifest(lambda m: m["tensors"]["layers.0.wq"].update(rows=7)), "config implies"),
    (_edit_manifest(lambda m: m["tensors"]["layers.0.ffn"].update(row_nbytes=3)), "do not fit"),
    (_edit_manifest(lambda m: m["config"].update(n_heads=-4)), "invalid config"),
    (_edit_manifest(lambda m: m["tensors"].pop("final_norm")), "missing tensors"),
    (_edit_manifest(lambda m: m["tensors"]["final_norm"].update(file="pieces.bin", offset=0)),
     "not weights.bin"),
    (_edit_manifest(lambda m: m["tensors"]["layers.0.wq"].update(
        codec="f32", row_nbytes=4 * m["tensors"]["layers.0.wq"]["cols"])), "recorded as f32"),
    (lambda p: (p / "pieces.bin").write_bytes(b"x" * (p / "pieces.bin").stat().st_size),
     "checksum mismatch"),
])
def test_corrupt_stores_are_refused(stores, tmp_path, edit, message):
    assert message in _corrupt(stores, tmp_path, edit)


def test_stores_of_another_codec_revision_are_refused(stores, tmp_path):
    """A store records the revision of every codec (the block palettes' tables became
    cubics in revision 2): one whose tensors were written at another revision is refused
    with the codec named and "convert again", since its bytes meant other weights."""
    source = stores("llama", "bpal4")
    manifest = json.loads((source / "manifest.json").read_text())
    assert manifest["codec_revisions"]["bpal4"] == codec("bpal4").revision == 2
    assert open_store(source).codec == "bpal4"
    for change, message in [
            (lambda m: m.pop("codec_revisions"), "bpal4 tensors of codec revision 1"),
            (lambda m: m["codec_revisions"].update(bpal4=3), "revision 3; this runtime"),
            (lambda m: m["codec_revisions"].update(bpal4="2"), "not a whole number")]:
        path = tmp_path / f"store-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(source, path)
        _edit_manifest(change)(path)
        with pytest.raises(StoreError, match=message):
            open_store(path)
    # a revision recorded for a codec the store does not use does not matter
    path = tmp_path / "other-codec"
    shutil.copytree(source, path)
    _edit_manifest(lambda m: m["codec_revisions"].update(int8=7))(path)
    assert open_store(path).codec == "bpal4"


def test_int4_stores_keep_the_down_projection_by_row(stores, tiny_gguf):
    """An int4 store also holds each down projection by row, encoded once from the source
    (store/down_rows.py); an int8 store, whose re-encoding is near-lossless, does not."""
    store = open_store(stores("llama", "int4"))
    source = load_checkpoint(tiny_gguf("llama")).weights
    assert store.down_rows is not None
    assert set(store.down_rows) == {layer_key(i, "ffn") for i in range(store.config.n_layers)}
    for i, layer in enumerate(source.layers):
        e = store.down_rows[layer_key(i, "ffn")]
        assert e.path.name == "down_rows.bin"
        raw = np.fromfile(e.path, np.uint8, e.nbytes, offset=e.offset).reshape(e.rows, -1)
        np.testing.assert_array_equal(raw, codec("int4").encode(layer.w_down))
    assert open_store(stores("llama", "int8")).down_rows is None


def _int4_copy(stores, tmp_path, edit):
    path = tmp_path / "store"
    shutil.copytree(stores("llama", "int4"), path)
    edit(path)
    return path


@pytest.mark.parametrize("edit, message", [
    (_edit_manifest(lambda m: m.update(down_rows={"codec": "int8"})), "do not match"),
    (_edit_manifest(lambda m: m["tensors"].pop("layers.1.ffn_down")), "rows are missing"),
    (_edit_manifest(lambda m: m["tensors"]["layers.0.ffn_down"].update(file="weights.bin")),
     "rows in down_rows.bin"),
    (_edit_manifest(lambda m: m["tensors"]["layers.0.ffn_down"].update(cols=64)),
     "config implies"),
    (lambda p: (p / "down_rows.bin").write_bytes(b""), "down_rows.bin has 0 bytes"),
])
def test_corrupt_down_rows_are_refused(stores, tmp_path, edit, message):
    with pytest.raises(StoreError, match=message):
        open_store(_int4_copy(stores, tmp_path, edit))


def test_resident_ffns_multiply_by_the_down_rows_where_the_store_has_them(stores, tmp_path):
    """Resident on the cpu backend, an int4 store's FFNs use its down rows: the logits are
    the float engine's on those rows within int8 activations' error. A store converted
    before down rows existed opens and runs with down re-encoded as int8 from the bundles:
    the float engine's logits on the bundles, to the same tolerance."""
    def drop(path):
        manifest = json.loads((path / "manifest.json").read_text())
        del manifest["down_rows"]
        del manifest["files"]["down_rows.bin"]
        for i in range(manifest["config"]["n_layers"]):
            del manifest["tensors"][layer_key(i, "ffn_down")]
        (path / "manifest.json").write_text(json.dumps(manifest))
        (path / "down_rows.bin").unlink()
    with_rows = stores("llama", "int4")
    older = _int4_copy(stores, tmp_path, drop)
    assert open_store(older).down_rows is None
    store = open_store(with_rows)
    by_bundles = decoded_weights(with_rows)
    by_rows = decoded_weights(with_rows)
    for i, layer in enumerate(by_rows.layers):
        e = store.down_rows[layer_key(i, "ffn")]
        raw = np.fromfile(e.path, np.uint8, e.nbytes, offset=e.offset).reshape(e.rows, -1)
        layer.w_down = codec("int4").decode(raw, e.cols)
    for path, weights in ((with_rows, by_rows), (older, by_bundles)):
        reference = reference_engine(store.config, weights)
        expected = reference.forward(np.array(IDS), reference.new_cache(64), all_logits=True)
        resident = fi.load(path).logits(IDS)
        assert np.abs(resident - expected).max() <= 3e-2 * np.abs(expected).max()


def test_only_backends_that_multiply_by_the_down_rows_read_them(stores, tmp_path):
    """Loading an int4 store resident, the cpu backend reads its down rows (beyond what the
    same store without them reads); the mlx backend prepares FFNs from the bundles' down
    columns and reads not a byte more than without them."""
    pytest.importorskip("mlx.core")
    with_rows = stores("llama", "int4")
    rows_nbytes = sum(e.nbytes for e in open_store(with_rows).down_rows.values())

    def drop(path):
        manifest = json.loads((path / "manifest.json").read_text())
        del manifest["down_rows"], manifest["files"]["down_rows.bin"]
        for i in range(manifest["config"]["n_layers"]):
            del manifest["tensors"][layer_key(i, "ffn_down")]
        (path / "manifest.json").write_text(json.dumps(manifest))
    older = _int4_copy(stores, tmp_path, drop)
    for backend in ("cpu", "mlx"):
        read = [fi.load(p, backend=backend).reader.stats.bytes_read for p in (with_rows, older)]
        if backend == "cpu":
            assert read[0] - read[1] >= rows_nbytes
        else:
            assert read[0] == read[1]


def test_codec_per_tensor_group(tiny_gguf, tmp_path):
    """A codec spec sets each group's codec; the manifest records it; the store runs."""
    path = convert(tiny_gguf("gemma3"), tmp_path / "mixed", "int8,ffn=pal3,embed=int4")
    store = open_store(path)
    assert store.tensors["layers.0.ffn"].codec == "pal3"
    assert store.tensors["layers.1.wo"].codec == "int8"
    assert store.tensors["embed"].codec == "int4"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["codecs"] == {"embed": "int4", "attn": "int8", "ffn": "pal3"}
    assert manifest["input_statistics"]["tokens"] >= 256  # pal3 fitted to calibration
    logits, _, _, _ = streamed_logits(path, None)
    assert np.isfinite(logits).all()
    for bad, message in (("int8,ffn=zip", "unknown codec"), ("int8,mlp=int4", "GROUP=CODEC"),
                         ("pal5", "unknown codec")):
        with pytest.raises(FlashInferError, match=message):
            convert(tiny_gguf("gemma3"), tmp_path / "bad", bad)


def test_codec_mix_chosen_by_measurement_meets_the_target(tiny_gguf, tmp_path):
    """--bits/--target-size: every (group, codec) measured; the choice fits the target with
    the least summed loss; the store has the chosen codecs and records the measurement."""
    from flashinfer_ondevice.build import codec_choice
    from flashinfer_ondevice.build.convert import choose_spec

    source = tiny_gguf("gemma3")
    spec, record = choose_spec(source, bits=5.0)
    table = record["measured"]
    assert set(table) == {"embed", "attn", "ffn"}
    vocab = open_store(convert(source, tmp_path / "int8", "int8")).config.vocab_size
    count = round(vocab / codec_choice.TIER_SHARE)
    tiered = {codec_choice.tier_name(h, count, c) for h, c in codec_choice.TIER_PAIRS}
    assert set(table["embed"]) == set(codec_choice.CANDIDATES) | tiered  # tied: also split
    assert all(set(table[g]) == set(codec_choice.CANDIDATES) for g in ("attn", "ffn"))
    for row in table.values():  # int8 is within rounding of the float model
        assert row["int8"]["kl"] < row["bpal2"]["kl"]
        assert row["int8"]["bytes"] > row["int4"]["bytes"] > row["bpal2"]["bytes"]
    choice = record["choice"]
    chosen_bytes = sum(table[g][n]["bytes"] for g, n in choice.items())
    assert chosen_bytes <= record["target_matrix_bytes"]
    loss = sum(table[g][n]["kl"] for g, n in choice.items())
    for names in itertools.product(*(table[g] for g in table)):  # nothing better fits
        cells = [table[g][n] for g, n in zip(table, names, strict=True)]
        if sum(c["bytes"] for c in cells) <= record["target_matrix_bytes"]:
            assert sum(c["kl"] for c in cells) >= loss - 1e-12
    path = convert(source, tmp_path / "chosen", spec, codec_choice_record=record)
    store = open_store(path)
    assert store.tensors["layers.0.ffn"].codec == choice["ffn"]
    assert store.tensors["embed"].codec == choice["embed"]
    matrices = sum(e.nbytes for n, e in store.tensors.items() if e.codec != "f32")
    assert matrices <= record["target_matrix_bytes"]
    assert json.loads((path / "manifest.json").read_text())["codec_choice"] == record
    with pytest.raises(FlashInferError, match="the smallest is"):
        choose_spec(source, matrix_nbytes=1000)
    # a split embedding, as a mix names it, converts to a store of the bytes measured
    name = codec_choice.tier_name("bpal4", count, "bpal2")
    path = convert(source, tmp_path / "tiered", codec_choice.spec_of(
        {"embed": name, "attn": "int8", "ffn": "int8"}))
    store = open_store(path)
    assert store.vocab_tiers.hot_rows == count
    assert store.tensors["embed"].nbytes + store.tensors["embed_cold"].nbytes == \
        table["embed"][name]["bytes"]


def test_a_split_embedding_is_measured_as_convert_stores_it(tiny_gguf):
    """The mix measures a split embedding from the two codecs' whole round trips; convert
    fits each tier's rows on their own. Rows are fitted one at a time, so both give the same
    rows, and the same loss."""
    from flashinfer_ondevice.build import codec_choice, vocab_tiers
    from flashinfer_ondevice.build.calibrate import default_text
    from flashinfer_ondevice.build.convert import STATS_CHUNK, STATS_TOKENS, calibration_chunks
    from flashinfer_ondevice.build.input_stats import InputStatsCollector, for_tied_embedding

    checkpoint = load_checkpoint(tiny_gguf("gemma3"))
    config, weights = checkpoint.config, checkpoint.weights
    chunks, held_out = calibration_chunks(checkpoint.tokenizer, default_text(), STATS_TOKENS,
                                          STATS_CHUNK)
    collector = InputStatsCollector(config, weights, chunks, False)
    layer_stats = [collector.layer(i, layer) for i, layer in enumerate(weights.layers)]
    head_stats = collector.head(weights.final_norm)
    hot = vocab_tiers.hot_tokens(collector.hidden, weights, config.norm_eps,
                                 config.vocab_size // 8)
    table = codec_choice.measure(config, weights, layer_stats, head_stats, held_out,
                                 candidates=("bpal4", "bpal2"), hot=hot)
    stats = for_tied_embedding(head_stats)
    variant = copy.copy(weights)
    variant.embed = np.empty_like(weights.embed)
    for mask, name in ((hot, "bpal4"), (~hot, "bpal2")):
        variant.embed[mask] = codec_choice.round_trip(codec(name))(weights.embed[mask], stats)
    reference = codec_choice.log_probs(config, weights, held_out)
    kl = codec_choice.mean_kl(reference, codec_choice.log_probs(config, variant, held_out))
    measured = table["embed"][codec_choice.tier_name("bpal4", int(hot.sum()), "bpal2")]
    assert measured.kl == pytest.approx(kl, rel=1e-6, abs=1e-9)
    assert table["embed"]["bpal2"].kl > measured.kl > 0


def test_a_corrupt_palette_table_is_caught_by_the_checksum(stores, tmp_path):
    """One flipped bit in a palette row's float16 table: --verify refuses the store."""
    path = tmp_path / "store"
    shutil.copytree(stores("gemma3", "pal4"), path)
    entry = open_store(path).tensors["layers.0.wq"]
    with open(path / "weights.bin", "r+b") as f:
        f.seek(entry.offset + 3 * entry.row_nbytes + 1)  # row 3, table entry 0, high byte
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ 0x40]))
    open_store(path)  # sizes and offsets are intact: only the checksum can tell
    with pytest.raises(StoreError, match="checksum mismatch in weights.bin"):
        open_store(path, verify=True)


@pytest.mark.parametrize("row_nbytes, scratch_pages", [(1000, 3), (5000, 4), (4096, 320)])
def test_read_rows_returns_exactly_the_rows_asked_for(tmp_path, row_nbytes, scratch_pages):
    data = np.random.default_rng(0).integers(0, 256, 300 * row_nbytes + 777, np.uint8)
    path = tmp_path / "rows.bin"
    path.write_bytes(data.tobytes() + bytes(-len(data) % 4096))  # stores are page-padded
    offset = 777  # rows not page-aligned: some straddle two pages
    rows = data[offset:].reshape(300, row_nbytes)
    reader = DirectReader(path)
    scratch = aligned_buffer(scratch_pages * 4096)
    for ids in (np.arange(300), np.array([0, 1, 2, 150, 298, 299]),
                np.sort(np.random.default_rng(1).choice(300, 97, replace=False))):
        out = np.zeros((len(ids), row_nbytes), np.uint8)
        before = reader.stats.snapshot()
        reader.read_rows(offset, row_nbytes, ids, scratch, out)
        np.testing.assert_array_equal(out, rows[ids])
        pages = {p for i in ids for p in range((offset + i * row_nbytes) // 4096,
                                               (offset + (i + 1) * row_nbytes - 1) // 4096 + 1)}
        # each distinct page read once, but for a page shared across a batch boundary
        read = reader.stats.since(before).bytes_read
        assert len(pages) * 4096 <= read <= (len(pages) + len(ids) - 1) * 4096
        if scratch_pages * 4096 >= 300 * row_nbytes + 2 * 4096:  # one batch: each page once
            assert read == len(pages) * 4096
    with pytest.raises(ValueError, match="cannot hold"):
        reader.read_rows(offset, row_nbytes, np.arange(10), aligned_buffer(4096), out)
