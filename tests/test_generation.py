"""Sampling and streaming: seeds, filters, stop strings, finish reasons, stats."""

import numpy as np
import pytest

import flashinfer_ondevice as fi
from flashinfer_ondevice.errors import ContextLengthError, FlashInferError
from flashinfer_ondevice.sampling import min_p_mask, repetition_penalty, top_k_mask, top_p_mask


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    return fi.load(tiny_gguf("qwen2"))


def test_same_seed_same_text(tiny):
    kwargs = dict(max_tokens=20, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = tiny.generate("abc", seed=11, **kwargs)
    assert a == tiny.generate("abc", seed=11, **kwargs)
    assert any(tiny.generate("abc", seed=s, **kwargs) != a for s in range(12, 16))


def test_top_k_one_is_greedy(tiny):
    greedy = tiny.generate("abc", max_tokens=12, temperature=0)
    assert tiny.generate("abc", max_tokens=12, temperature=1.5, top_k=1, seed=5) == greedy


def test_filters():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    assert top_k_mask(probs, 2).tolist() == [True, True, False, False]
    assert top_p_mask(probs, 0.8).tolist() == [True, True, False, False]
    assert top_p_mask(probs, 0.81).tolist() == [True, True, True, False]
    assert min_p_mask(probs, 0.2).tolist() == [True, True, True, False]
    logits = np.array([2.0, -2.0, 1.0])
    assert repetition_penalty(2.0)([0, 1], logits).tolist() == [1.0, -4.0, 1.0]


@pytest.mark.parametrize("top_k, top_p, min_p", [(40, 0.95, 0.05), (5, 0.5, 0.0),
                                                  (0, 0.9, 0.1), (1000, 1.0, 0.2)])
def test_sampler_draws_what_the_filters_on_the_whole_vocabulary_give(top_k, top_p, min_p):
    """The sampler filters top-k's candidates only; it picks the token that the three masks
    over the whole vocabulary and a draw over all of it pick, seed for seed."""
    from flashinfer_ondevice.functional import softmax
    from flashinfer_ondevice.sampling import make_sampler

    rng = np.random.default_rng(3)
    for seed in range(40):
        logits = (rng.standard_normal(5000) * rng.uniform(0.5, 4)).astype(np.float32)
        sample = make_sampler(0.7, top_p, top_k, min_p, seed=seed)
        probs = softmax(logits.astype(np.float64) / 0.7)
        keep = top_k_mask(probs, top_k) & top_p_mask(probs, top_p) & min_p_mask(probs, min_p)
        kept = np.where(keep, probs, 0.0)
        expected = int(np.random.default_rng(seed).choice(len(kept), p=kept / kept.sum()))
        assert sample(logits) == expected


def test_stream_responses_and_finish_reasons(tiny):
    responses = list(tiny.stream("abc", max_tokens=6, temperature=0))
    assert len(responses) == 6
    assert [r.finish_reason for r in responses] == [None] * 5 + ["length"]
    last = responses[-1]
    assert last.prompt_tokens == len(tiny.tokenize("abc")) and last.generation_tokens == 6
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.peak_memory > 0
    assert "".join(r.text for r in responses) == tiny.detokenize([r.token for r in responses])


def test_stop_string_cuts_output(tiny):
    full = tiny.generate("abc", max_tokens=30, temperature=0)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    cut = list(tiny.stream("abc", max_tokens=30, temperature=0, stop=[stop]))
    text = "".join(r.text for r in cut)
    assert text == full[: full.index(stop)]
    assert cut[-1].finish_reason == "stop"


def test_eos_ends_generation(tiny):
    eos = next(iter(tiny.tokenizer.eog_ids))
    head = tiny.engine.weights.lm_head

    class EosFirst:  # the output layer with EOS made the argmax everywhere
        rows = head.rows

        def apply(self, x):
            logits = head.apply(x)
            logits[:, eos] = logits.max() + 50
            return logits

    tiny.engine.weights.lm_head = EosFirst()
    try:
        responses = list(tiny.stream("abc", max_tokens=10, temperature=0))
    finally:
        tiny.engine.weights.lm_head = head
    assert responses[-1].finish_reason == "stop" and responses[-1].text == ""


def test_bad_arguments(tiny):
    with pytest.raises(FlashInferError, match="empty"):
        tiny.logits([])
    with pytest.raises(FlashInferError, match="outside the vocabulary"):
        tiny.logits([10**6])
    with pytest.raises(ContextLengthError):
        list(tiny.stream(list(range(5, 5 + 300))))
