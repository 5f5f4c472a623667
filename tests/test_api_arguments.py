"""The API's own checks of its arguments, and logits() for chosen positions in bounded memory.

A tiny Hugging Face folder (its tokenizer needs no llama.cpp), loaded once."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tiny_models import write_hf_folder

import flashinfer_ondevice as fi
from flashinfer_ondevice import api
from flashinfer_ondevice.errors import ArgumentError


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = write_hf_folder(tmp_path_factory.mktemp("hf") / "llama", "llama")
    return fi.load(folder, threads=1, backend="numpy")


def test_logits_of_chosen_positions_equal_the_full_rows(model):
    ids = [1, *range(5, 45)]
    full = model.logits(ids)
    assert full.shape == (len(ids), model.config.vocab_size)
    np.testing.assert_array_equal(model.logits(ids, positions=[-1]), full[-1:])
    np.testing.assert_array_equal(model.logits(ids, positions=[0, 7, 40]), full[[0, 7, 40]])


def test_logits_beyond_the_cap_are_refused_before_any_work(model, monkeypatch):
    monkeypatch.setattr(api, "MAX_LOGITS_BYTES", 10 * model.config.vocab_size * 4)
    with pytest.raises(ArgumentError, match="at most 10 positions"):
        model.logits([1] * 11)
    assert model.logits([1] * 11, positions=[-1]).shape == (1, model.config.vocab_size)


@pytest.mark.parametrize("positions, match", [
    ([3, 1], "increasing"), ([2, 2], "distinct"), ([99], "out of range"), ([], "empty"),
    ("1", "list of integers"), ([1.0], "integer")])
def test_bad_positions(model, positions, match):
    with pytest.raises(ArgumentError, match=match):
        model.logits([1, 5, 6, 7], positions=positions)


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": math.nan}, "temperature"), ({"top_p": 0.0}, "top_p"),
    ({"top_k": -1}, "top_k"), ({"min_p": math.inf}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"seed": -1}, "seed"),
    ({"max_tokens": 0}, "max_tokens"), ({"stop": "x"}, "stop"), ({"stop": [""]}, "stop")])
def test_sampling_arguments(model, kwargs, match):
    with pytest.raises(ArgumentError, match=match):
        model.generate([1, 5, 6], **{"max_tokens": 2, **kwargs})


@pytest.mark.parametrize("ids, match", [
    ([1, -1], "outside the vocabulary"), ([1, True], "not an integer"), (b"ab", "prompt"),
    (None, "prompt"), ([1, 2.0], "not an integer")])
def test_token_ids(model, ids, match):
    with pytest.raises(ArgumentError, match=match):
        model.generate(ids, max_tokens=1)
    with pytest.raises(ArgumentError, match=match):
        model.detokenize(ids)


@pytest.mark.parametrize("kwargs, match", [
    ({"backend": "tpu"}, "backend"), ({"ctx_size": 0}, "ctx_size"),
    ({"threads": "2"}, "threads"), ({"head": "fast"}, "head"), ({"codec": None}, "codec"),
    ({"memory_budget": math.nan}, "memory budget"), ({"window": 0}, "window")])
def test_load_arguments(model, kwargs, match):
    with pytest.raises(ArgumentError, match=match):
        fi.load(model.path, **kwargs)
