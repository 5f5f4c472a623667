"""Llama, Qwen2 and Gemma 3 tiny random-weight GGUFs: our logits against llama.cpp's.

Tolerance: max |difference| <= 2e-3 x max |logit|, with llama.cpp at its defaults (fp16 KV
cache). Both sides round the KV cache to fp16 (2^-11 relative per element) but sum in
different orders, which leaves differences of ~5e-4 relative (measured: llama 5.0e-4, qwen2
6.4e-5, gemma3 1.0e-4). Real mistakes (rope pairing, a missing bias, a wrong norm or window)
give errors of the order of the logits themselves.
"""

import numpy as np
import pytest
from conftest import llama_cpp_model

import flashinfer_ondevice as fi


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_logits_match_llama_cpp(arch, tiny_gguf):
    path = tiny_gguf(arch)
    model = fi.load(path, backend="reference")
    rng = np.random.default_rng(7)
    ids = [1, *rng.integers(3, model.config.vocab_size, 120).tolist()]
    reference = llama_cpp_model(path)
    reference.eval(ids)
    expected = np.array(reference.scores[: len(ids)])
    ours = model.logits(ids)
    assert ours.shape == expected.shape
    rel = np.abs(ours - expected).max() / np.abs(expected).max()
    assert rel <= 2e-3, f"{arch}: max relative logit difference {rel:.2e}"
    assert (ours.argmax(1) == expected.argmax(1)).mean() >= 0.98


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_decode_with_cache_equals_batch_prefill(arch, tiny_gguf):
    """Token-by-token decode through the KV cache gives the batch prefill's logits."""
    model = fi.load(tiny_gguf(arch), backend="reference")
    ids = [1, *range(10, 40)]
    batch = model.logits(ids)
    cache = model.engine.new_cache(64)
    steps = np.concatenate([model.engine.forward(np.array([t]), cache) for t in ids])
    np.testing.assert_allclose(steps, batch, rtol=0, atol=2e-3 * np.abs(batch).max())


def test_tokenizer_matches_llama_cpp(tiny_gguf):
    path = tiny_gguf("llama")
    model = fi.load(path)
    reference = llama_cpp_model(path)
    text = "hello world, bytes \u00e9\u4e2d"
    assert model.tokenize(text) == reference.tokenize(text.encode(), add_bos=True, special=True)
    ids = model.tokenize(text, add_special=False)
    assert model.detokenize(ids) == reference.detokenize(ids).decode()
