"""The KV cache: sliding-window rings give the logits of a cache that keeps every position,
cache types round-trip and are counted as planned, and the decode kernel reading the stored
entries in place computes the numpy attention."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from tiny_models import write_hf_folder

import flashinfer_ondevice as fi
from flashinfer_ondevice import kv_cache
from flashinfer_ondevice.backends.attention_kernels import CHUNK
from flashinfer_ondevice.backends.base import Backend
from flashinfer_ondevice.backends.cpu import PARALLEL_ENTRIES, CpuBackend
from flashinfer_ondevice.cli import main
from flashinfer_ondevice.config import ModelConfig
from flashinfer_ondevice.errors import FlashInferError
from flashinfer_ondevice.kv_cache import KVCache, KVEntries, encode

IDS = [1, *range(5, 41)]  # 37 tokens; the tiny Gemma 3's window is 4


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return write_hf_folder(tmp_path_factory.mktemp("hf") / "gemma3", "gemma3")


def every_position(config: ModelConfig, max_tokens: int,
                   resident: int | None = None) -> list[tuple[int, None]]:
    """The cache before rings: every layer keeps every position (windows only mask)."""
    return [(max_tokens, None)] * config.n_layers


def stepped_logits(model, ids: list[int]) -> np.ndarray:
    """Logits of every position, one token per forward pass (the decode path)."""
    cache = model.engine.new_cache(len(ids))
    return np.concatenate([model.engine.forward(np.array([t]), cache) for t in ids])


@pytest.mark.parametrize("cache_type", ["f16", "q8"])
@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_window_rings_give_the_logits_of_a_cache_of_every_position(gemma, monkeypatch,
                                                                    cache_type, backend):
    """Prefill in one batch, in batches of 5 (window layers gather the window before each
    batch) and one token at a time (decode reads the ring in place): the same logits as when
    every layer keeps every position, to the rounding of summing in another order; bit for
    bit while the prompt fits the window."""
    model = fi.load(gemma, backend=backend, cache_type=cache_type, stream_all=True)

    def run() -> dict[str, np.ndarray]:
        logits = {"one batch": model.logits(IDS), "stepped": stepped_logits(model, IDS),
                  "short": model.logits(IDS[:4])}
        with monkeypatch.context() as patch:
            patch.setattr(model.engine, "prefill_batch", 5)
            logits["batches of 5"] = model.logits(IDS)
        return logits

    ring = run()
    monkeypatch.setattr(kv_cache, "_layer_slots", every_position)
    full = run()
    assert np.array_equal(ring.pop("short"), full["short"])
    scale = np.abs(full["one batch"]).max()
    for how, logits in ring.items():
        assert np.abs(logits - full[how]).max() <= 1e-4 * scale, how  # summation order


def random_entries(rng, cache_type: str, kv_heads: int, n: int, head_dim: int,
                   spare: int) -> KVEntries:
    """Entries as the cache hands them out: n of (kv_heads, n + spare, head_dim) slots."""
    k = rng.standard_normal((n + spare, kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((n + spare, kv_heads, head_dim)).astype(np.float32)
    (kd, ks), (vd, vs) = encode(k, cache_type), encode(v, cache_type)
    positions = np.concatenate([rng.permutation(n), np.full(spare, -1)]).astype(np.int64)
    return KVEntries(kd, vd, ks, vs, positions, n)  # a ring's slots are not in order


@pytest.mark.parametrize("cache_type", ["f16", "q8", "f32"])
@pytest.mark.parametrize("kv_heads,group,head_dim", [(1, 4, 64), (2, 3, 32)])
@pytest.mark.parametrize("n", [7, CHUNK + 45, PARALLEL_ENTRIES + 300])
@pytest.mark.parametrize("n_tokens,window", [(1, None), (1, 100), (3, 50)])
def test_decode_kernel_matches_numpy_attention(cache_type, kv_heads, group, head_dim, n,
                                               n_tokens, window):
    rng = np.random.default_rng(n + kv_heads)
    kv = random_entries(rng, cache_type, kv_heads, n, head_dim, spare=5)
    q = (rng.standard_normal((kv_heads, group, n_tokens, head_dim)) / 4).astype(np.float32)
    q_positions = np.arange(n - n_tokens, n, dtype=np.int64)
    for f16_probabilities in (False, True):
        expected = Backend().attention(q, kv, q_positions, window, f16_probabilities)
        got = CpuBackend().attention(q, kv, q_positions, window, f16_probabilities)
        assert got.shape == expected.shape
        # rounding probabilities to float16 turns summation-order differences into whole
        # float16 steps now and then
        tolerance = 1e-4 if f16_probabilities else 2e-5
        assert np.abs(got - expected).max() <= tolerance * np.abs(expected).max()


def test_numpy_attention_blocks_keys_and_queries_as_one(monkeypatch):
    """Scores a few queries and KEY_BLOCK keys at a time: the same as all at once."""
    from flashinfer_ondevice.backends import base
    rng = np.random.default_rng(3)
    kv = random_entries(rng, "f16", 2, 300, 16, spare=0)
    q = rng.standard_normal((2, 2, 40, 16)).astype(np.float32)
    q_positions = np.arange(260, 300, dtype=np.int64)
    whole = Backend().attention(q, kv, q_positions, 64, False)
    monkeypatch.setattr(base, "KEY_BLOCK", 32)
    monkeypatch.setattr(base, "SCORE_BYTES", 7 * 2 * 2 * 300 * 4)  # 7 queries a block
    blocked = Backend().attention(q, kv, q_positions, 64, False)
    assert np.abs(blocked - whole).max() <= 1e-6 * np.abs(whole).max()


def test_q8_round_trips_within_half_a_step():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 3, 64)).astype(np.float32) * rng.uniform(0.01, 100, (9, 3, 1))
    x[4, 1] = 0.0  # an all-zero head stays exactly zero
    data, scales = encode(x, "q8")
    assert data.dtype == np.int8 and scales.shape == (3, 9)
    assert np.abs(data).max() <= 127 and (np.abs(data).max(axis=2)[scales > 0] == 127).all()
    decoded = (data.astype(np.float32) * scales[..., None]).transpose(1, 0, 2)
    assert np.all(np.abs(decoded - x) <= scales.T[..., None] * 0.5 * (1 + 1e-6))
    assert not decoded[4, 1].any()


GEMMA_270M = ModelConfig("gemma3", vocab_size=262144, hidden_size=640, n_layers=18,
                         n_heads=4, n_kv_heads=1, head_dim=256, ffn_size=2048,
                         norm_eps=1e-6, context_length=32768, rope_theta=1e6,
                         rope_theta_local=1e4, sliding_window=512, sliding_window_pattern=6)


@pytest.mark.parametrize("ctx", [100, 600, 32768])
def test_cache_bytes_follow_type_and_windows(ctx):
    """15 window layers keep min(512, ctx) slots, 3 global layers ctx: per slot K and V of
    one head of 256 values (f16: 2 bytes each; q8: 1 byte each + a 4-byte scale)."""
    slots = 15 * min(512, ctx) + 3 * ctx
    assert KVCache.planned_nbytes(GEMMA_270M, ctx, "f16") == slots * 2 * 256 * 2
    assert KVCache.planned_nbytes(GEMMA_270M, ctx, "q8") == slots * 2 * (256 + 4)
    for cache_type in ("f16", "q8", "f32"):
        cache = KVCache(GEMMA_270M, ctx, cache_type)
        assert cache.nbytes() == KVCache.planned_nbytes(GEMMA_270M, ctx, cache_type)


def test_planned_kv_bytes_are_the_cache_of_the_chosen_type(gemma):
    """The plan reserves what the cache allocates; what it has written is min(tokens, slots)
    of each layer (a window layer's ring stops growing at its window)."""
    for cache_type in ("f16", "q8"):
        model = fi.load(gemma, ctx_size=64, cache_type=cache_type)
        cache = model.engine.new_cache(64)
        model.engine.forward(np.array(IDS), cache)
        assert cache.nbytes() == model.plan.kv_bytes
        slots = [s for s, _ in kv_cache._layer_slots(model.config, 64)]
        per_slot = cache.nbytes() // sum(slots)
        assert cache.used_nbytes() == per_slot * sum(min(len(IDS), s) for s in slots)
        assert min(slots) == 4 and max(slots) == 64


def test_cache_type_is_checked_and_reaches_the_cli(gemma):
    with pytest.raises(FlashInferError, match="unknown KV cache type 'q4'"):
        fi.load(gemma, cache_type="q4")
    result = CliRunner().invoke(main, ["generate", "-m", str(gemma), "-p", "hello", "-n", "4",
                                       "--temp", "0", "--cache-type", "q8"])
    assert result.exit_code == 0, result.output
    assert "KV cache (q8)" in result.output
    result = CliRunner().invoke(main, ["generate", "-m", str(gemma), "-p", "hi",
                                       "--cache-type", "q4"])
    assert result.exit_code == 2 and "q4" in result.output
