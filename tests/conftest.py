"""Shared fixtures: the real default model, llama.cpp on it, and tiny random GGUFs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    from flashinfer_ondevice.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def gemma(gemma_path):
    import flashinfer_ondevice as fi

    return fi.load(gemma_path, threads=2)


@pytest.fixture(scope="session")
def gemma_store(gemma_path, tmp_path_factory) -> Path:
    """The real model's int8 flash store, converted once per session into a temporary
    models folder."""
    import os

    from flashinfer_ondevice.api import ensure_store

    os.environ.setdefault("FLASHINFER_MODELS_DIR", str(tmp_path_factory.mktemp("models")))
    return ensure_store(gemma_path, "int8")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_gguf(tiny_dir):
    """arch -> path of a tiny random-weight GGUF, written once per session."""
    from tiny_models import write_gguf

    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = write_gguf(tiny_dir / f"{arch}.gguf", arch)
        return cache[arch]

    return get


def llama_cpp_model(path: Path, **kwargs):
    from llama_cpp import Llama

    params = {"n_ctx": 512, "n_batch": 512, "n_threads": 2, "logits_all": True,
              "verbose": False, **kwargs}
    return Llama(str(path), **params)
