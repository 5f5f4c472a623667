"""Shared fixtures: the real default model, llama.cpp on it, and tiny random GGUFs.

Two tiers: `python -m pytest -m "not slow"` runs without llama.cpp (llama-cpp-python) and
without the real model, in under a minute; the full suite (what CI runs) runs everything.
Tests that use the real model or a GGUF (whose tokenizer is llama.cpp's) are marked slow by
the fixtures they take; others are marked where they are written.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SLOW_FIXTURES = {"gemma_path", "gemma", "gemma_store", "tiny_gguf", "stores"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: needs llama.cpp or the real model (the fast "
                            "tier is -m 'not slow')")
    if "FLASHINFER_MODELS_DIR" not in os.environ:  # stores the tests convert go here
        folder = tempfile.mkdtemp(prefix="flashinfer-test-models-")
        atexit.register(shutil.rmtree, folder, True)
        os.environ["FLASHINFER_MODELS_DIR"] = folder


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    from flashinfer_ondevice.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def gemma(gemma_path):
    import flashinfer_ondevice as fi

    return fi.load(gemma_path, backend="reference", threads=2)


@pytest.fixture(scope="session")
def gemma_store(gemma_path, tmp_path_factory) -> Path:
    """The real model's int8 flash store, converted once per session into the tests' models
    folder."""
    from flashinfer_ondevice.api import ensure_store

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


_RUNS_HERE = """
import sys
from llama_cpp import Llama
llm = Llama(sys.argv[1], n_ctx=64, n_threads=2, verbose=False)
llm.eval(llm.tokenize(b"The capital of France is"))
"""
_checked: set[Path] = set()


def check_llama_cpp_runs(path: Path) -> None:
    """Fail (never skip) the calling test when llama.cpp cannot evaluate `path` on this CPU:
    it runs in a child first, so a build that dies here (an illegal instruction) is a clear
    failure rather than the end of the test session."""
    if path in _checked:
        return
    child = subprocess.run([sys.executable, "-c", _RUNS_HERE, str(path)], capture_output=True,
                           text=True, timeout=300)
    if child.returncode != 0:
        pytest.fail(f"llama.cpp cannot run {path.name} on this CPU (exit {child.returncode}; "
                    f"a negative exit is a signal, -4 an illegal instruction): the "
                    f"llama-cpp-python build does not fit this machine; see the README's "
                    f"set-up command.\n{child.stderr[-2000:]}", pytrace=False)
    _checked.add(path)


def llama_cpp_model(path: Path, **kwargs):
    from llama_cpp import Llama

    check_llama_cpp_runs(path)
    params = {"n_ctx": 512, "n_batch": 512, "n_threads": 2, "logits_all": True,
              "verbose": False, **kwargs}
    return Llama(str(path), **params)
