"""llama.cpp in this process, safely: the GGUF tokenizer's library, loaded once and quietly,
and checked in a child process before this process first uses it on a file.

llama-cpp-python compiles llama.cpp on the user's machine. A build that does not run on this
CPU (one made with native flags on another machine, or AMX code on a machine whose kernel or
hypervisor does not enable it) dies with an illegal instruction, and a vocabulary llama.cpp
rejects can abort it: either would take the user's whole process down. So the first use of a
(library, file, CPU) combination runs the same vocabulary load and a tokenization in a child;
if the child dies, the user gets a one-line error saying why, and the runtime's own kernels
(numba) are untouched. A combination that passed is remembered in a small marker file.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

from ..errors import FlashInferError, ModelFileError

CHECK_TIMEOUT = 120  # seconds a child may take to load a vocabulary
_NOT_INSTALLED = ("llama-cpp-python is not installed; GGUF tokenizers need it "
                  "(pip install llama-cpp-python)")
_INSTALL_HINT = ("reinstall llama-cpp-python with the portable build the README's set-up "
                 "command makes")
_CHILD = """
import ctypes, sys
import llama_cpp
sink = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)(lambda *a: None)
llama_cpp.llama_log_set(sink, None)
llama_cpp.llama_backend_init()
if len(sys.argv) < 2:
    sys.exit(0)
params = llama_cpp.llama_model_default_params()
params.vocab_only = True
model = llama_cpp.llama_model_load_from_file(sys.argv[1].encode(), params)
if not model:
    sys.exit(3)
vocab = llama_cpp.llama_model_get_vocab(model)
buffer = (llama_cpp.llama_token * 64)()
text = "Hello, world: 1234 \\u00e9\\u65e5\\u672c".encode()
if llama_cpp.llama_tokenize(vocab, text, len(text), buffer, 64, True, True) <= 0:
    sys.exit(4)
llama_cpp.llama_model_free(model)
"""
_checked: set[str] = set()


class LlamaCppError(FlashInferError):
    """llama.cpp is missing, or cannot run on this CPU."""


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _discard_log(level, text, user_data):
    """llama.cpp log sink: the vocabulary loader's chatter is not for our users."""


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


@functools.cache
def load_llama_cpp():
    """The llama_cpp module, its library loaded, logging silenced and its backend initialised
    (once per process, after a child process showed that this does not crash here)."""
    check_vocabulary(None)
    try:
        import llama_cpp
    except ImportError:
        raise LlamaCppError(_NOT_INSTALLED) from None
    except (OSError, RuntimeError) as exc:  # the shared library does not load
        raise LlamaCppError(f"llama.cpp's library does not load ({exc}); "
                            f"{_INSTALL_HINT}") from None
    llama_cpp.llama_log_set(_discard_log, None)
    llama_cpp.llama_backend_init()
    return llama_cpp


def cpu_description() -> str:
    """The CPU's model name and flags (what decides whether a build runs here)."""
    model, flags = "unknown CPU", ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key.strip() in ("flags", "Features") and not flags:
                    flags = value.strip()
                if flags and model != "unknown CPU":
                    break
    except OSError:
        pass
    return f"{model} [{flags}]"


def _marker(path: Path | None) -> Path:
    """The marker of a check that passed: keyed by the library, the file and the CPU."""
    spec = importlib.util.find_spec("llama_cpp")
    lib = Path(spec.origin).parent / "lib" if spec and spec.origin else Path("?")
    identity = [cpu_description(), sys.executable]
    for item in sorted(lib.glob("*")) + ([] if path is None else [path]):
        try:
            stat = item.stat()
            identity.append(f"{item.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
        except OSError:
            identity.append(str(item))
    key = hashlib.sha256("\n".join(identity).encode()).hexdigest()[:32]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "flashinfer-ondevice" / "llama-checks" / key


def check_vocabulary(path: Path | None) -> None:
    """Make sure llama.cpp can load the vocabulary of GGUF `path` and tokenize with it on
    this CPU without taking the process down (`path` None: load its library): a child
    process does it first, once."""
    key = "" if path is None else str(Path(path).resolve())
    if key in _checked:
        return
    if not llama_cpp_available():
        raise LlamaCppError(_NOT_INSTALLED)
    what = "its library" if path is None else "the vocabulary"
    marker = _marker(path)
    if not marker.is_file():
        try:
            child = subprocess.run([sys.executable, "-c", _CHILD,
                                    *([] if path is None else [str(path)])],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, timeout=CHECK_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise LlamaCppError(f"llama.cpp took over {CHECK_TIMEOUT} s to load {what}"
                                + ("" if path is None else f" of {path}")) from None
        if child.returncode < 0:
            try:
                name = signal.Signals(-child.returncode).name
            except ValueError:
                name = f"signal {-child.returncode}"
            hint = (f"its library was built for a different CPU than this one "
                    f"({cpu_description().split(' [')[0]}); {_INSTALL_HINT}"
                    if name == "SIGILL" else "the file may be hostile or corrupt")
            raise LlamaCppError(f"llama.cpp crashed ({name}) loading {what}"
                                + ("" if path is None else f" of {path}") + f": {hint}")
        if child.returncode == 3:
            raise ModelFileError(f"{path}: llama.cpp could not read the GGUF vocabulary")
        if child.returncode != 0:
            detail = child.stderr.decode(errors="replace").strip().splitlines()
            raise LlamaCppError(f"llama.cpp failed loading {what}"
                                + ("" if path is None else f" of {path}")
                                + f" ({detail[-1] if detail else f'exit {child.returncode}'})")
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(key + "\n")
        except OSError:
            pass  # an unwritable cache only costs the check next time
    _checked.add(key)
