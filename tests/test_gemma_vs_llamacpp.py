"""The real Gemma 3 270M (Q4_K_M): our logits and greedy text against llama.cpp's.

What can be asserted, and why. On this model llama.cpp does not agree with itself across its
own evaluation modes: batched prefill vs token-by-token differ by ~0.21 logits on average (max
~2.5) and pick the same top-1 token at only ~95% of positions (measured in
test_agreement_is_at_llama_cpp_self_consistency). The cause is discrete rounding (Q8
activation quantization, the fp16 GELU table) flipping on 1e-7 float differences and Gemma 3's
massive-activation residual stream amplifying the flips. So we check:
  * position 0 (no attention mixing) bit-for-bit: every rounding of the path is reproduced;
  * >= 99% top-1 agreement at every position that is not a near-tie for the reference;
  * overall top-1 agreement no worse than llama.cpp's agreement with itself, minus 2 points;
  * greedy continuations identical until llama.cpp itself faces a near-tie.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SHARED_DATA, check_llama_cpp_runs, llama_cpp_model

from flashinfer_ondevice.generate import prefill

N_POSITIONS = 300
NEAR_TIE = 0.5  # logits; llama.cpp's own batch-vs-sequential difference has median ~0.15
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


def test_llama_cpp_runs_the_real_model(gemma_path):
    """The reference itself must run on this CPU: if the llama-cpp-python build does not
    (an illegal instruction), this fails with the reason, never skips."""
    check_llama_cpp_runs(gemma_path)


@pytest.fixture(scope="module")
def eval_ids(gemma):
    text = (SHARED_DATA / "calibration-python-tutorial.txt").read_text(encoding="utf-8")
    return gemma.tokenize(text[:4000])[:N_POSITIONS]


@pytest.fixture(scope="module")
def reference_logits(gemma_path, eval_ids):
    batched = llama_cpp_model(gemma_path)
    batched.eval(eval_ids)
    sequential = llama_cpp_model(gemma_path, n_batch=1, n_ubatch=1)
    sequential.eval(eval_ids)
    n = len(eval_ids)
    return np.array(batched.scores[:n]), np.array(sequential.scores[:n])


def _margin(logits: np.ndarray) -> np.ndarray:
    top2 = np.sort(logits, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def test_tokenizer_matches_llama_cpp(gemma, gemma_path, eval_ids):
    reference = llama_cpp_model(gemma_path, vocab_only=True)
    text = (SHARED_DATA / "calibration-python-tutorial.txt").read_text(encoding="utf-8")[:4000]
    assert eval_ids == reference.tokenize(text.encode(), add_bos=True, special=True)[:N_POSITIONS]
    assert gemma.detokenize(gemma.tokenize(text, add_special=False)) == text


def test_logits_match_llama_cpp(gemma, eval_ids, reference_logits):
    expected, _ = reference_logits
    ours = gemma.logits(eval_ids)
    assert len(eval_ids) >= 256 and ours.shape == expected.shape
    diff = np.abs(ours - expected)
    agree = ours.argmax(1) == expected.argmax(1)
    clear = _margin(expected) >= NEAR_TIE
    report = {"positions": len(eval_ids), "max_abs_diff": float(diff.max()),
              "mean_abs_diff": float(diff.mean()), "top1_agreement": float(agree.mean()),
              "clear_positions": int(clear.sum()),
              "top1_agreement_clear": float(agree[clear].mean()),
              "position0_max_abs_diff": float(diff[0].max())}
    print("gemma vs llama.cpp:", json.dumps(report))
    assert diff[0].max() < 1e-3, "the non-attention path no longer matches llama.cpp exactly"
    assert clear.sum() >= 200
    assert agree[clear].mean() >= 0.99, report


def test_agreement_is_at_llama_cpp_self_consistency(gemma, eval_ids, reference_logits):
    batched, sequential = reference_logits
    self_agreement = (batched.argmax(1) == sequential.argmax(1)).mean()
    ours = gemma.logits(eval_ids).argmax(1)
    for reference in (batched, sequential):
        assert (ours == reference.argmax(1)).mean() >= self_agreement - 0.02


def _llama_cpp_greedy(reference, prompt_ids: list[int], n: int) -> tuple[list[int], list[float]]:
    reference.reset()
    reference.eval(prompt_ids)
    tokens, margins = [], []
    for _ in range(n):
        logits = np.array(reference.scores[reference.n_tokens - 1])
        tokens.append(int(logits.argmax()))
        margins.append(float(_margin(logits)))
        reference.eval([tokens[-1]])
    return tokens, margins


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_continuation_matches_llama_cpp(gemma, gemma_path, prompt):
    reference = llama_cpp_model(gemma_path, n_ctx=256)
    ids = gemma.tokenize(prompt)
    expected, margins = _llama_cpp_greedy(reference, ids, 64)
    ours = [r.token for r in gemma.stream(ids, max_tokens=64, temperature=0)]
    first_tie = next((i for i, m in enumerate(margins) if m < NEAR_TIE), len(margins))
    pairs = enumerate(zip(ours, expected, strict=False))
    same = next((i for i, (a, b) in pairs if a != b), min(len(ours), len(expected)))
    print(f"{prompt!r}: identical for {same}/64 tokens; llama.cpp's first near-tie at "
          f"{first_tie}")
    assert same >= min(first_tie, len(ours)), (same, first_tie)


WINDOW = 512  # Gemma 3 270M's sliding window


@pytest.fixture(scope="module")
def long_ids(gemma):
    text = (SHARED_DATA / "calibration-python-tutorial.txt").read_text(encoding="utf-8")
    ids = gemma.tokenize(text[:12000])
    assert len(ids) >= WINDOW + 100
    return ids[:WINDOW + 100]


def test_logits_past_the_window_match_llama_cpp(gemma, gemma_path, long_ids):
    """Positions 520..611 (the window layers' rings have wrapped; prefill gathered the
    window before the second batch) pick llama.cpp's top-1 token where it is clear."""
    start = WINDOW + 8
    reference = llama_cpp_model(gemma_path, n_ctx=len(long_ids))
    reference.eval(long_ids)
    expected = np.array(reference.scores[start:len(long_ids)])
    cache = gemma.engine.new_cache(len(long_ids))
    prefill(gemma.engine, long_ids[:start], cache)
    ours = gemma.engine.forward(np.array(long_ids[start:]), cache, all_logits=True)
    clear = _margin(expected) >= NEAR_TIE
    agree = ours.argmax(1) == expected.argmax(1)
    print(f"past the window: top-1 agreement {agree[clear].mean():.3f} on {clear.sum()} clear "
          f"positions, mean |diff| {np.abs(ours - expected).mean():.3f}")
    assert clear.sum() >= 40 and agree[clear].mean() >= 0.97


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_decode_past_the_window_follows_llama_cpp(gemma, gemma_path, gemma_store, long_ids,
                                                 backend):
    """After a prompt longer than the window, each decode step (rings read in place; on the
    cpu backend by the numba kernel, from the int8 store with float activations) picks
    llama.cpp's next token on its own greedy path wherever llama.cpp is not near a tie."""
    import flashinfer_ondevice as fi

    reference = llama_cpp_model(gemma_path, n_ctx=len(long_ids) + 40)
    expected, margins = _llama_cpp_greedy(reference, long_ids, 32)
    model = gemma if backend == "reference" else fi.load(gemma_store, threads=2,
                                                         quality="exact")
    cache = model.engine.new_cache(len(long_ids) + 40)
    logits = prefill(model.engine, long_ids, cache)[-1]
    ours = []
    for token in expected:  # teacher-forced on llama.cpp's path
        ours.append(int(logits.argmax()))
        logits = model.engine.forward(np.array([token]), cache)[-1]
    clear = np.array(margins) >= NEAR_TIE
    agree = np.array(ours) == np.array(expected)
    print(f"{backend}: decode past the window agrees on {agree[clear].sum()}/{clear.sum()} "
          "clear steps")
    assert clear.sum() >= 16 and agree[clear].mean() >= 0.95
