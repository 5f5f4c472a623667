"""The KV spill: global layers keeping their last positions in DRAM and the older ones in a
file give the logits of a cache that keeps everything; what is read back is what the
spilled blocks hold; a corrupt or truncated spill file is an error; the planner spills only
when the context's cache does not fit, and refuses naming a budget that works."""

from __future__ import annotations

import os

import numpy as np
import pytest
from tiny_models import write_hf_folder

import flashinfer_ondevice as fi
from flashinfer_ondevice.generate import prefill
from flashinfer_ondevice.kv_cache import CACHE_TYPES, MIN_RESIDENT, KVCache
from flashinfer_ondevice.kv_spill import BLOCK, SpillError
from flashinfer_ondevice.memory import aligned_buffer

CONTEXT = 4096
PROMPT = MIN_RESIDENT + BLOCK - 12  # decode steps cross the next block's spill


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """The tiny Gemma 3 (one global layer in 7, window 4) with a context that spills."""
    return write_hf_folder(tmp_path_factory.mktemp("hf") / "gemma3", "gemma3",
                           context_length=CONTEXT)


def token_ids(n: int) -> list[int]:
    return [1, *np.random.default_rng(0).integers(5, 40, n - 1).tolist()]


def spilling(model, directory) -> None:
    model.engine.kv_resident_tokens, model.engine.kv_spill_dir = MIN_RESIDENT, directory


def run(model, ids: list[int], steps: int) -> tuple[np.ndarray, KVCache]:
    """Logits of a prompt in batches of 512, then of `steps` decode steps."""
    cache = model.engine.new_cache(len(ids) + steps)
    logits = [prefill(model.engine, ids, cache, all_logits=True)]
    for token in token_ids(steps + 1)[1:]:
        logits.append(model.engine.forward(np.array([token]), cache))
    return np.concatenate(logits), cache


# Attention merged from parts (log-sum-exp weights) sums in another order: ~1e-7 of the
# logits' range with a float32 cache; a quantized cache then stores the next layer's keys
# and values, and a value that lands the other side of a rounding step (1/127 of a head's
# range in q8) carries the difference on
TOLERANCE = {"f32": 1e-5, "f16": 1e-4, "q8": 1e-3}


@pytest.mark.parametrize("cache_type", list(TOLERANCE))
@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_spilled_cache_gives_the_logits_of_a_resident_one(gemma, tmp_path, cache_type,
                                                         backend):
    model = fi.load(gemma, backend=backend, cache_type=cache_type, stream_all=True)
    ids, steps = token_ids(PROMPT), 24
    resident, _ = run(model, ids, steps)
    spilling(model, tmp_path)
    spilled, cache = run(model, ids, steps)
    assert np.abs(spilled - resident).max() <= TOLERANCE[cache_type] * np.abs(resident).max()
    assert (spilled.argmax(axis=1) == resident.argmax(axis=1)).mean() >= 0.999
    assert np.array_equal(spilled[:MIN_RESIDENT], resident[:MIN_RESIDENT])  # before spilling
    assert cache.resident_tokens == MIN_RESIDENT
    assert not list(tmp_path.iterdir())  # the spill file is unlinked from the start
    # bytes read back: each spilled block of keys and values (and scales), for every step
    # of every batch after its spill; prefill reads the blocks spilled before each batch
    config = model.config
    per_block = BLOCK * config.n_kv_heads * 2 * (
        config.head_dim * np.dtype(CACHE_TYPES[cache_type]).itemsize
        + (4 if cache_type == "q8" else 0))
    ends = [*range(512, len(ids), 512), len(ids), *range(len(ids) + 1, len(ids) + steps + 1)]
    blocks = [-(-max(0, end - MIN_RESIDENT) // BLOCK) for end in ends]
    assert cache.spill.bytes_written == max(blocks) * per_block
    assert cache.spill_stats.bytes_read == sum(blocks) * per_block
    cache.close()


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_a_damaged_spill_file_is_an_error(gemma, tmp_path, damage):
    model = fi.load(gemma, backend="cpu", stream_all=True)
    spilling(model, tmp_path)
    cache = model.engine.new_cache(CONTEXT)
    prefill(model.engine, token_ids(PROMPT), cache)
    model.engine.forward(np.array([7]), cache)  # reads the spilled block back intact
    fd = cache.spill._fd
    if damage == "corrupt":
        page = aligned_buffer(4096)
        page[:] = 0xA5
        os.pwrite(fd, page, 0)
    else:
        os.ftruncate(fd, 4096)
    with pytest.raises(SpillError, match=damage):
        model.engine.forward(np.array([8]), cache)
    cache.close()


def test_planned_bytes_are_allocated_when_spilling(gemma):
    """The planner's figure for a spilling cache is what the cache allocates: rings, the
    global layers' MIN_RESIDENT slots and the two staged chunks."""
    config = fi.load(gemma, stream_all=True).config
    for cache_type in ("f16", "q8"):
        cache = KVCache(config, CONTEXT, cache_type, MIN_RESIDENT, gemma.parent)
        assert cache.nbytes() == KVCache.planned_nbytes(config, CONTEXT, cache_type,
                                                        MIN_RESIDENT)
        cache.close()
        # a resident limit at least the context spills nothing
        assert KVCache(config, CONTEXT, cache_type, CONTEXT).spill is None


def test_the_planner_spills_only_what_does_not_fit(gemma_store, tmp_path):
    """The real model at a 32k context: resident when the budget holds the whole cache;
    below that, global layers keep positions in DRAM and spill the rest, resident weights
    first; the smallest budget named in the refusal works, one byte less does not; what is
    planned is what the cache allocates."""
    from flashinfer_ondevice.runtime.planner import BudgetError, make_plan
    from flashinfer_ondevice.store.reader import open_store

    store, ctx = open_store(gemma_store), 32768
    full = KVCache.planned_nbytes(store.config, ctx, "f16")
    roomy = make_plan(store, store.nbytes + 2 * full, ctx, 0)
    assert roomy.kv_resident_tokens is None and roomy.kv_bytes == full
    with pytest.raises(BudgetError, match="spilling older ones to flash") as refused:
        make_plan(store, 1, ctx, 0)
    smallest = refused.value.smallest
    tight = make_plan(store, smallest, ctx, 0)
    assert tight.kv_resident_tokens == MIN_RESIDENT and tight.kv_bytes < full / 2
    with pytest.raises(BudgetError):
        make_plan(store, smallest - 1, ctx, 0)
    half = make_plan(store, store.nbytes // 2, ctx, 0)
    assert half.kv_resident_tokens is not None
    assert half.streamed_bytes < tight.streamed_bytes  # the room went to weights
    cache = KVCache(store.config, ctx, "f16", half.kv_resident_tokens, tmp_path)
    assert cache.nbytes() == half.kv_bytes  # planned is allocated
    cache.close()
