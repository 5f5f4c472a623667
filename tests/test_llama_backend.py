"""llama.cpp may not run on this CPU (a build made for another one dies with an illegal
instruction): the tokenizer's check in a child turns that into a one-line error, this process
survives, and the runtime's own kernels keep working."""

from __future__ import annotations

import numpy as np
import pytest

from flashinfer_ondevice.loader import llama_backend
from flashinfer_ondevice.quant.codecs import codec

CRASH = "import os, signal; os.kill(os.getpid(), signal.SIG{}); raise SystemExit(0)"


@pytest.fixture
def fresh_checks(monkeypatch, tmp_path):
    """No remembered checks: markers go to an empty cache folder; the children below stand in
    for llama.cpp, so it need not be installed."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(llama_backend, "llama_cpp_available", lambda: True)
    monkeypatch.setattr(llama_backend, "_checked", set())
    return tmp_path


@pytest.mark.parametrize("signal_name,words", [("ILL", "different CPU"),
                                               ("ABRT", "hostile or corrupt")])
def test_a_crashing_llama_cpp_is_a_clear_error(fresh_checks, monkeypatch, signal_name, words):
    monkeypatch.setattr(llama_backend, "_CHILD", CRASH.format(signal_name))
    vocab = fresh_checks / "model.gguf"
    vocab.write_bytes(b"GGUF")
    with pytest.raises(llama_backend.LlamaCppError, match=f"SIG{signal_name}.*{words}"):
        llama_backend.check_vocabulary(vocab)
    assert not list((fresh_checks / "cache").rglob("*"))  # nothing remembered as good
    # this process is alive and computes with its own kernels
    x = np.linspace(-1, 1, 128, dtype=np.float32)
    w = np.random.default_rng(0).standard_normal((8, 128)).astype(np.float32)
    int8 = codec("int8")
    raw, out = int8.encode(w), np.empty(8, np.float32)
    int8.matvec(raw, x, out)  # the numba kernel
    np.testing.assert_allclose(out, int8.decode(raw, 128) @ x, rtol=1e-5, atol=1e-5)


def test_a_passing_check_is_remembered(fresh_checks, monkeypatch):
    calls = fresh_checks / "calls"
    monkeypatch.setattr(llama_backend, "_CHILD",
                        f"open({str(calls)!r}, 'a').write('x')")
    vocab = fresh_checks / "model.gguf"
    vocab.write_bytes(b"GGUF")
    llama_backend.check_vocabulary(vocab)
    monkeypatch.setattr(llama_backend, "_checked", set())  # a new process
    llama_backend.check_vocabulary(vocab)
    assert calls.read_text() == "x"  # the marker spared the second child
    vocab.write_bytes(b"GGUF changed")  # another file: checked again
    monkeypatch.setattr(llama_backend, "_checked", set())
    llama_backend.check_vocabulary(vocab)
    assert calls.read_text() == "xx"


@pytest.mark.slow
def test_the_installed_llama_cpp_build_is_portable():
    """The README's build (-DGGML_NATIVE=OFF) holds no AVX-512 and no AMX instruction, so it
    runs on every x86-64-v3 CPU, AMX-reporting Xeons included (objdump of its libraries)."""
    import platform
    import shutil
    import subprocess
    from importlib.util import find_spec
    from pathlib import Path

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 instruction sets only")
    assert shutil.which("objdump"), "objdump (binutils) is needed to inspect the build"
    libraries = sorted((Path(find_spec("llama_cpp").origin).parent / "lib").glob("*.so"))
    assert libraries, "llama_cpp ships no shared libraries"
    for library in libraries:
        code = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)],
                              capture_output=True, text=True, check=True).stdout
        assert "zmm" not in code, f"{library.name} uses AVX-512: not the README's build"
        assert "tilezero" not in code and "tileloadd" not in code, \
            f"{library.name} uses AMX: not the README's build"


def test_models_that_need_no_llama_cpp_run_beside_a_broken_one(fresh_checks, monkeypatch):
    """A build that crashes only fails GGUF tokenizers: the runtime's baseline is still
    taken (Hugging Face models tokenize without llama.cpp)."""
    from flashinfer_ondevice.runtime import engine

    monkeypatch.setattr(llama_backend, "_CHILD", CRASH.format("ILL"))
    monkeypatch.setattr(engine, "llama_cpp_available", lambda: True)
    with pytest.raises(llama_backend.LlamaCppError, match="SIGILL"):
        llama_backend.load_llama_cpp.__wrapped__()  # the library itself, checked in a child
    monkeypatch.setattr(engine, "load_llama_cpp", llama_backend.load_llama_cpp.__wrapped__)
    assert engine.process_baseline.__wrapped__() > 0
