"""Public API: `load()` a model, then `tokenize`, `logits`, `generate` and `stream` with it.

One engine: `load` runs every source (GGUF file, Hugging Face folder, flash store) from a
flash store, converting a source once into the models folder as `run-model` does, on a
backend (backends/: the fast `cpu` path by default), under a memory budget when given one.
`backend="reference"` runs the float32 numpy reference on the source instead (for
correctness checks against llama.cpp).
Load-time settings (context size, threads, budget) are arguments of `load`; sampling settings
are arguments of each call, as in ollama and llama-cpp-python.
"""

from __future__ import annotations

import contextlib
import hashlib
import numbers
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from .backends import BACKENDS, make_backend
from .build.convert import convert_in_child
from .chat import render_chat
from .default_model import default_model_path, models_dir
from .errors import ArgumentError, ContextLengthError, FlashInferError, os_error_line
from .generate import GenerationResponse, prefill, stream_generate
from .kv_cache import check_cache_type
from .loader import check_source, load_checkpoint, source_config
from .model import reference_engine
from .quant.codecs import parse_codec_spec, with_tier_count
from .runtime.engine import (
    DEFAULT_CTX,
    PlannedSession,
    Session,
    check_device_budget,
    context_size,
    open_store_session,
    plan_store_session,
    process_baseline,
)
from .runtime.planner import HEAD_PLANS
from .runtime.store_choice import QUALITY_MODES
from .sampling import check_sampling, make_logits_processors, make_sampler
from .store.reader import is_store
from .store.sparsity_record import SELECTORS
from .values import describe, flag, integer, number

MAX_NAME_BYTES = 96  # of a source's name in its stores' names (file names end at 255 bytes)
MAX_CHARS_PER_TOKEN = 64  # a prompt longer than this per context token cannot fit
MAX_LOGITS_BYTES = 2 << 30  # Model.logits: the largest (positions x vocabulary) array it returns
REFERENCE = "reference"  # load(backend=...): the float32 numpy run of the source file itself


class Model:
    """A loaded model: tokenizer, weights and forward pass."""

    def __init__(self, session: Session, load_seconds: float):
        self.session = session
        self.config = session.config
        self.tokenizer = session.tokenizer
        self.chat_template = session.chat_template
        self.engine = session.engine
        self.ctx_size = session.ctx_size
        self.plan = session.plan  # memory plan when running from a flash store
        self.reader = session.reader  # its direct-I/O reader (counters in reader.stats)
        self.weights = session.weights
        self.path = session.path
        self.load_seconds = load_seconds
        self._closed = False
        self._guard = threading.Lock()  # protects the two fields below
        self._user: int | None = None  # the thread generating with this model, if any
        self._generations = 0  # its generations in progress (interleaved streams)

    def close(self) -> None:
        """Release the store's reader threads and files; the model is unusable after."""
        self._closed = True
        self.session.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ArgumentError("this model was closed; load it again")

    @contextlib.contextmanager
    def _generating(self) -> Iterator[None]:
        """One thread at a time generates with a model: its KV caches are separate, but
        the engine's scratch buffers and neuron caches are shared (a second thread gets an
        error, not wrong text)."""
        me = threading.get_ident()
        with self._guard:
            if self._generations and self._user != me:
                raise ArgumentError("this model is generating in another thread; load one "
                                    "model per thread")
            self._user, self._generations = me, self._generations + 1
        try:
            yield
        finally:
            with self._guard:
                self._generations -= 1

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # tokens ---------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        self._check_open()
        if not isinstance(text, str):
            raise ArgumentError(f"the text to tokenize must be a string, got {describe(text)}")
        flag(add_special, "add_special", ArgumentError)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ArgumentError("the text is not valid Unicode (it holds a lone surrogate "
                                "code point)") from None
        return self.tokenizer.encode(text, add_special=add_special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(self._token_ids(ids))

    def apply_chat_template(self, messages: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and all(isinstance(m.get(k), str) for k in ("role",
                                                                              "content"))
                for m in messages):
            raise ArgumentError("messages must be a list of {'role': str, 'content': str}")
        if not self.chat_template:
            raise FlashInferError("this model has no chat template")
        bos_id = self.tokenizer.bos_id
        bos = self.tokenizer.special_text(bos_id) if bos_id is not None else ""
        return render_chat(self.chat_template, messages, bos_token=bos,
                           add_generation_prompt=add_generation_prompt)

    def chat_prompt_ids(self, prompt: str, system_prompt: str | None = None) -> list[int]:
        """Token ids of `prompt` as a user turn in the model's chat template."""
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        text = self.apply_chat_template([*messages, {"role": "user", "content": prompt}])
        bos = self.tokenizer.bos_id
        has_bos = bos is not None and text.startswith(self.tokenizer.special_text(bos))
        return self.tokenize(text, add_special=not has_bos)

    # evaluation -----------------------------------------------------------------------
    def logits(self, ids: Sequence[int], positions: Sequence[int] | None = None) -> np.ndarray:
        """Next-token logits at every position of `ids` (or at `positions` only, e.g. [-1]):
        float32 (positions, vocab). At most MAX_LOGITS_BYTES are returned; memory beyond
        that is one prefill batch's, whatever the length of `ids`."""
        self._check_open()
        ids = self._checked_ids(ids, reserve=0)
        rows = np.arange(len(ids)) if positions is None else self._positions(positions, len(ids))
        nbytes = len(rows) * self.config.vocab_size * 4
        if nbytes > MAX_LOGITS_BYTES:
            raise ArgumentError(
                f"logits of {len(rows)} positions would take {nbytes / 1e9:.1f} GB (limit "
                f"{MAX_LOGITS_BYTES / 1e9:.1f} GB): ask for at most "
                f"{MAX_LOGITS_BYTES // (self.config.vocab_size * 4)} positions at a time "
                "with positions=..., or score long texts with run-model eval")
        cache = self.engine.new_cache(len(ids))
        try:
            return prefill(self.engine, ids, cache, rows=rows)
        finally:
            cache.close()

    @staticmethod
    def _positions(positions: Sequence[int], n: int) -> np.ndarray:
        """`positions` (negative ones count from the end) as sorted distinct indices."""
        if isinstance(positions, str | bytes) or not isinstance(positions,
                                                                Sequence | np.ndarray):
            raise ArgumentError(f"positions must be a list of integers, got {describe(positions)}")
        rows = []
        for p in positions:
            index = integer(p, "position", -n, n - 1, error=ArgumentError)
            rows.append(index % n)
        if not rows:
            raise ArgumentError("positions is empty")
        order = np.array(sorted(set(rows)), np.int64)
        if len(order) != len(rows) or rows != sorted(rows):
            raise ArgumentError("positions must be distinct and in increasing order")
        return order

    # generation -----------------------------------------------------------------------
    def stream(self, prompt: str | Sequence[int], max_tokens: int = 256,
               temperature: float = 0.8, top_p: float = 0.95, top_k: int = 40,
               min_p: float = 0.05, repetition_penalty: float = 1.0, seed: int | None = None,
               stop: Sequence[str] = ()) -> Iterator[GenerationResponse]:
        """Yield a `GenerationResponse` per token; the last has `finish_reason` set."""
        integer(max_tokens, "max_tokens", 1, 1 << 31, error=ArgumentError)
        check_sampling(temperature, top_p, top_k, min_p, repetition_penalty, seed)
        if isinstance(stop, str) or not isinstance(stop, Sequence) or \
                not all(isinstance(s, str) and s for s in stop):
            raise ArgumentError("stop must be a list of non-empty strings")
        self._check_open()
        if isinstance(prompt, str) and len(prompt) > self.ctx_size * MAX_CHARS_PER_TOKEN:
            raise ContextLengthError(  # refused before tokenizing it costs memory
                f"the prompt is {len(prompt):,} characters; the context holds "
                f"{self.ctx_size} tokens")
        ids = self.tokenize(prompt) if isinstance(prompt, str) else self._token_ids(prompt)
        ids = self._checked_ids(ids, reserve=1)
        sampler = make_sampler(temperature, top_p, top_k, min_p, seed)
        processors = make_logits_processors(repetition_penalty)
        with self._generating():
            cache = self.engine.new_cache(self.ctx_size)
            try:
                yield from stream_generate(
                    self.engine, self.tokenizer, ids, cache, sampler, processors, max_tokens,
                    stop, self.reader.stats if self.reader is not None else None)
            finally:
                cache.close()

    def generate(self, prompt: str | Sequence[int], **kwargs) -> str:
        """The generated text; takes the arguments of `stream`."""
        return "".join(response.text for response in self.stream(prompt, **kwargs))

    def _token_ids(self, ids: Sequence[int]) -> list[int]:
        """`ids` as a list of ints inside the vocabulary (anything else: ArgumentError)."""
        if isinstance(ids, str | bytes) or not isinstance(ids, Sequence | np.ndarray) or \
                np.ndim(ids) != 1:
            raise ArgumentError(f"the prompt must be a string or a list of token ids, got "
                                f"{describe(ids)}")
        checked = []
        for token in ids:
            if isinstance(token, bool) or not isinstance(token, numbers.Integral):
                raise ArgumentError(f"token id {describe(token)} is not an integer")
            if not 0 <= token < self.config.vocab_size:
                raise ArgumentError(f"token id {int(token)} is outside the vocabulary "
                                    f"(0..{self.config.vocab_size - 1})")
            checked.append(int(token))
        return checked

    def _checked_ids(self, ids: Sequence[int], reserve: int) -> list[int]:
        """Validate token ids; `reserve` > 0 also requires room for that many new tokens."""
        ids = self._token_ids(ids)
        if not ids:
            raise ArgumentError("the prompt is empty")
        if reserve and len(ids) + reserve > self.ctx_size:
            hint = (f"raise -c/--ctx-size, up to {self.config.context_length}"
                    if self.ctx_size < self.config.context_length else
                    "the model's whole context")
            raise ContextLengthError(
                f"prompt is {len(ids)} tokens; the context holds {self.ctx_size} ({hint})")
        if len(ids) > self.config.context_length:
            raise ContextLengthError(f"{len(ids)} tokens exceed the model's context of "
                                     f"{self.config.context_length}")
        return ids


def load(path: str | Path | None = None, *, backend: str = "cpu",
         memory_budget: str | int | None = None, ctx_size: int | None = None,
         threads: int | None = None, codec: str = "int8", verify: bool = False,
         progress: bool | None = None, on_plan: Callable[[str], None] | None = None,
         stream_all: bool = False, selector: str | None = None,
         sparsity: float | None = None, window: int | None = None,
         head: str = "auto", quality: str = "auto", cache_type: str | None = None,
         gpu_memory_budget: str | int | None = None) -> Model:
    """Load a model; no path loads the embedded default model.

    path: a GGUF file, a Hugging Face folder or a flash store. A GGUF or folder is converted
      once into a store (kept in the models folder) and run from it.
    backend: what computes from the store's bytes (backends/): "cpu" (the fast path), "numpy"
      (plain numpy, what the others are tested against) or "mlx" (where MLX is installed);
      or "reference": the float32 numpy run of the source file itself (no store, no budget).
    memory_budget: memory above the process's baseline: bytes, "120MB", "1.5GB" or "50%"
      (of the store). None runs the store fully resident.
    gpu_memory_budget: bytes of weights the mlx backend keeps in its own (device) form, in
      the same units: the planner places resident weights there first, then in DRAM (up to
      memory_budget), the rest streams from the store. Where MLX's memory is the process's
      (its CPU device, Apple silicon) the memory budget counts it too. None: every resident
      weight in the device form without a memory budget, none under one.
    ctx_size: context window in tokens (default min(4096, the model's); 1024 under a budget).
    cache_type: the KV cache's type: "f16" (the default, as llama.cpp) or "q8" (int8 with a
      scale per head per token: half the memory; "f32" too for the reference, whose
      default it is on float checkpoints). Sliding-window layers keep only their window.
    threads: CPU threads for matrix products (default: all cores).
    codec: store codec when converting (see quant/codecs.py: "int8", "int4", "int4fit", "bpal4",
      "bpal3", "bpal2", "pal4", "pal3", "pal2", "f16"), optionally per tensor group:
      "bpal3,embed=bpal4" (groups: embed, attn, ffn).
    verify: check the store's checksums before running.
    progress: show progress bars (default: when stderr is a terminal).
    on_plan: called with the memory plan's description before any weight is read.
    stream_all: keep no weight resident, whatever the budget (benchmark baseline).
    selector: FFN activation sparsity for a calibrated store: "gate" (exact gate-first),
      "predicted" (low-rank predictor, no reads for skipped neurons) or "dense" (off).
      Default: gate-first when the FFNs are resident, else the store's calibrated default.
    sparsity: target fraction of FFN neurons skipped (a calibrated one; default from the store).
    window: tokens whose neurons the neuron caches keep (default from the store).
    head: the output layer's plan in a store: "exact" (every logit exact; rows that do not
      fit stream every token), "shortlist" (a resident low-rank proxy scores every token,
      the best candidates are computed exactly; see runtime/shortlist_head.py) or "auto"
      (shortlist when the output layer does not fit the budget).
    quality: under a budget, how to choose between the store of `codec` and the other stores
      of the same source already in the models folder (runtime/store_choice.py): "exact"
      (the `codec` store, every logit exact), "auto" (least read per token within +5%
      expected perplexity, as measured at convert) or "fastest" (least read per token).
      Without a budget, "exact" also keeps float activations: otherwise the backend may
      keep resident matrices in its own form (the cpu backend: onnxruntime's MatMulNBits
      with int8 activations, as llama.cpp computes; cost measured in docs/benchmarks.md).
    """
    _check_load_arguments(path, backend, ctx_size, threads, codec, selector, sparsity, window,
                          head, quality, cache_type)
    check_device_budget(backend, gpu_memory_budget)
    for name, value in (("verify", verify), ("stream_all", stream_all),
                        ("progress", False if progress is None else progress)):
        flag(value, name, ArgumentError)
    with os_errors():
        if progress is None:
            progress = sys.stderr.isatty()
        if threads is not None:
            from numba import set_num_threads
            set_num_threads(min(threads, os.cpu_count() or threads))
            threadpool_limits(limits=threads)  # after numba's OpenMP library is loaded
        start = time.perf_counter()
        path = default_model_path(progress=progress) if path is None else Path(path)
        if backend == REFERENCE:
            asked = {"memory_budget": memory_budget, "selector": selector, "sparsity": sparsity,
                     "window": window, "head": None if head == "auto" else head,
                     "quality": None if quality == "auto" else quality,
                     "stream_all": stream_all or None}
            given = [name for name, value in asked.items() if value is not None]
            if given:
                raise FlashInferError(f"{', '.join(given)}: flash-store settings; the reference "
                                      "runs the source file in memory")
            if is_store(path):
                raise FlashInferError("the reference runs a GGUF file or Hugging Face folder, "
                                      "not a flash store")
            return Model(_reference_session(path, ctx_size, progress, cache_type),
                         time.perf_counter() - start)
        store = ensure_store(path, codec, progress)
        alternatives = [] if store == path else stores_of(path)
        session = open_store_session(store, memory_budget, ctx_size, verify, on_plan, stream_all,
                                     selector, sparsity, window, head, quality, alternatives,
                                     make_backend(backend, threads), prepare=True,
                                     cache_type=cache_type or "f16",
                                     gpu_memory_budget=gpu_memory_budget)
        return Model(session, time.perf_counter() - start)


@contextlib.contextmanager
def os_errors() -> Iterator[None]:
    """The operating system's errors (a file name too long, a folder in the way, no space)
    as one-line FlashInferErrors naming the file."""
    try:
        yield
    except OSError as exc:
        raise FlashInferError(os_error_line(exc)) from None


def _check_load_arguments(path, backend, ctx_size, threads, codec, selector, sparsity, window,
                          head, quality, cache_type) -> None:
    """Refuse load() arguments of the wrong type or range before anything is read."""
    if path is not None and not isinstance(path, str | os.PathLike):
        raise ArgumentError(f"path must be a file or folder name, got {describe(path)}")
    if path is not None and "\0" in os.fspath(path):
        raise ArgumentError("path holds a NUL character")
    choices = {"backend": (backend, (*BACKENDS, REFERENCE)), "head": (head, HEAD_PLANS),
               "quality": (quality, QUALITY_MODES),
               "selector": (selector, (None, *SELECTORS, "dense"))}
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            shown = ", ".join(str(a) for a in allowed if a is not None)
            raise ArgumentError(f"unknown {name} {describe(value)} (use {shown})")
    if ctx_size is not None:
        integer(ctx_size, "ctx_size", 1, 1 << 24, error=ArgumentError)
    if threads is not None:
        integer(threads, "threads", 1, 4096, error=ArgumentError)
    if window is not None:
        integer(window, "window", 1, 1 << 16, error=ArgumentError)
    if sparsity is not None:
        number(sparsity, "sparsity", 0.0, 1.0, low_open=False, error=ArgumentError)
    if not isinstance(codec, str):
        raise ArgumentError(f"codec must be a string such as 'int8', got {describe(codec)}")
    if cache_type is not None:
        check_cache_type(cache_type)


def plan(path: str | Path | None = None, *, backend: str = "cpu",
         memory_budget: str | int | None = None, ctx_size: int | None = None,
         codec: str = "int8", selector: str | None = None, sparsity: float | None = None,
         window: int | None = None, head: str = "auto", quality: str = "auto",
         cache_type: str | None = None, gpu_memory_budget: str | int | None = None,
         progress: bool | None = None) -> PlannedSession:
    """The memory plan load() would run with for these arguments, reading no weight (the
    model is converted first if it never was). `backend` and `gpu_memory_budget` as for
    load(): a backend with a device tier places weights in it."""
    if backend == REFERENCE:
        raise FlashInferError("the reference runs the source file in memory: it has no plan")
    check_device_budget(backend, gpu_memory_budget)
    if progress is None:
        progress = sys.stderr.isatty()
    path = default_model_path(progress=progress) if path is None else Path(path)
    store = ensure_store(path, codec, progress)
    alternatives = [] if store == path else stores_of(path)
    return plan_store_session(store, memory_budget, ctx_size, False, False, selector, sparsity,
                              window, head, quality, alternatives, cache_type or "f16",
                              make_backend(backend), gpu_memory_budget)


def _reference_session(path: Path, ctx_size: int | None, progress: bool,
                       cache_type: str | None) -> Session:
    """The float32 numpy reference on a GGUF file or Hugging Face folder."""
    process_baseline()
    checkpoint = load_checkpoint(path, progress=progress)
    config = checkpoint.config
    ctx = context_size(config, ctx_size, DEFAULT_CTX)
    engine = reference_engine(config, checkpoint.weights, checkpoint.ggml_numerics)
    if cache_type is not None:
        engine.cache_type = check_cache_type(cache_type)
    return Session(config, checkpoint.tokenizer, checkpoint.chat_template, engine, ctx,
                   checkpoint.source)


def store_path_for(source: Path, codec: str) -> Path:
    """Where the store converted from `source` lives in the models folder; the name carries
    the source's identity (path, size, modification time), so a replaced file is converted
    again rather than served from a stale store. A hot tier given as a share of the
    vocabulary is named by its count, so both spellings of one store find it."""
    if "%" in codec:
        codec = with_tier_count(codec, source_config(source).vocab_size)
    spec = codec.replace(",", "+").replace("=", "-").replace("/", "-")
    return models_dir() / f"{_store_prefix(source)}{spec}.store"


def _store_prefix(source: Path) -> str:
    """The start of the names of `source`'s stores: its name and a tag of its identity."""
    stat = source.stat()
    identity = f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    tag = hashlib.sha256(identity).hexdigest()[:10]
    name = source.name.removesuffix(".gguf").encode()[:MAX_NAME_BYTES]
    return f"{name.decode('utf-8', errors='ignore')}-{tag}."


def stores_of(source: Path) -> list[Path]:
    """The stores converted from `source` in the models folder, whatever their codecs."""
    prefix = _store_prefix(source)
    folder = models_dir()
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith(prefix)
                  and p.name.endswith(".store") and is_store(p))


def ensure_store(source: Path, codec: str = "int8", progress: bool = False) -> Path:
    """The store of `source`, converting it the first time (in a child process: conversion
    holds the embeddings and a block in float32, and this process's memory must stay as the
    budget plans it)."""
    if not source.exists():
        raise FlashInferError(f"model not found: {source}")
    if is_store(source):
        return source
    try:
        parse_codec_spec(codec)
    except ValueError as exc:
        raise FlashInferError(str(exc)) from None
    target = store_path_for(source, codec)
    if not is_store(target):
        check_source(source)  # refused here in one line, not after starting a child
        if progress:
            print(f"converting {source} to a flash store (once)", file=sys.stderr)
        convert_in_child(source, target, codec, progress)
    return target
