"""Public API: `load()` a model, then `tokenize`, `logits`, `generate` and `stream` with it.

Load-time settings (context size, threads) are arguments of `load`; sampling settings are
arguments of each call, as in ollama and llama-cpp-python.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from . import kernels
from .chat import render_chat
from .errors import ContextLengthError, FlashInferError
from .generate import GenerationResponse, prefill, stream_generate
from .loader import Checkpoint, load_checkpoint
from .loader.tokenizer import init_llama_backend
from .memory import current_rss_bytes
from .model import Transformer
from .runtime.planner import Plan, SparseSettings, make_plan, parse_budget
from .runtime.streamed import StreamedWeights
from .sampling import make_logits_processors, make_sampler
from .sparsity.record import MAX_WINDOW, SELECTORS
from .store.format import ALIGN
from .store.io import DirectReader
from .store.reader import Store, is_store, open_store

DEFAULT_CTX = 4096
BUDGET_DEFAULT_CTX = 1024  # default context under a memory budget (its KV cache is resident)
kernels.warm_up()
init_llama_backend()
BASELINE_RSS = current_rss_bytes()  # the interpreter with this package (and its kernels) loaded


class Model:
    """A loaded model: tokenizer, weights and forward pass."""

    def __init__(self, checkpoint: Checkpoint, ctx_size: int | None, load_seconds: float,
                 plan: Plan | None = None, reader: DirectReader | None = None):
        self.plan = plan  # memory plan when running from a flash store
        self.reader = reader  # its direct-I/O reader (counters in reader.stats)
        self.config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.chat_template = checkpoint.chat_template
        self.path = checkpoint.source
        self.load_seconds = load_seconds
        self.weights = checkpoint.weights
        self.engine = Transformer(checkpoint.config, checkpoint.weights, checkpoint.ggml_numerics)
        limit = self.config.context_length
        self.ctx_size = min(DEFAULT_CTX, limit) if ctx_size is None else ctx_size
        if not 1 <= self.ctx_size <= limit:
            raise FlashInferError(f"context size {self.ctx_size} is outside 1..{limit}, "
                                  "the model's trained context")

    # tokens ---------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def apply_chat_template(self, messages: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
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
    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Next-token logits at every position of `ids`: float32 (len(ids), vocab)."""
        ids = self._checked_ids(ids, reserve=0)
        cache = self.engine.new_cache(len(ids))
        return prefill(self.engine, ids, cache, all_logits=True)

    # generation -----------------------------------------------------------------------
    def stream(self, prompt: str | Sequence[int], max_tokens: int = 256,
               temperature: float = 0.8, top_p: float = 0.95, top_k: int = 40,
               min_p: float = 0.05, repetition_penalty: float = 1.0, seed: int | None = None,
               stop: Sequence[str] = ()) -> Iterator[GenerationResponse]:
        """Yield a `GenerationResponse` per token; the last has `finish_reason` set."""
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        ids = self._checked_ids(ids, reserve=1)
        if max_tokens < 1:
            raise FlashInferError(f"max_tokens must be at least 1, got {max_tokens}")
        sampler = make_sampler(temperature, top_p, top_k, min_p, seed)
        processors = make_logits_processors(repetition_penalty)
        cache = self.engine.new_cache(self.ctx_size)
        yield from stream_generate(self.engine, self.tokenizer, ids, cache, sampler, processors,
                                   max_tokens, stop,
                                   self.reader.stats if self.reader is not None else None)

    def generate(self, prompt: str | Sequence[int], **kwargs) -> str:
        """The generated text; takes the arguments of `stream`."""
        return "".join(response.text for response in self.stream(prompt, **kwargs))

    def _checked_ids(self, ids: Sequence[int], reserve: int) -> list[int]:
        """Validate token ids; `reserve` > 0 also requires room for that many new tokens."""
        ids = [int(t) for t in ids]
        if not ids:
            raise FlashInferError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise FlashInferError(f"token id {bad[0]} is outside the vocabulary "
                                  f"(0..{self.config.vocab_size - 1})")
        if reserve and len(ids) + reserve > self.ctx_size:
            raise ContextLengthError(
                f"prompt is {len(ids)} tokens; the context holds {self.ctx_size} "
                f"(raise -c/--ctx-size, up to {self.config.context_length})")
        if len(ids) > self.config.context_length:
            raise ContextLengthError(f"{len(ids)} tokens exceed the model's context of "
                                     f"{self.config.context_length}")
        return ids


def load(path: str | Path | None = None, *, memory_budget: str | int | None = None,
         ctx_size: int | None = None, threads: int | None = None, codec: str = "int8",
         verify: bool = False, progress: bool | None = None,
         on_plan: Callable[[str], None] | None = None, stream_all: bool = False,
         selector: str | None = None, sparsity: float | None = None,
         window: int | None = None, head: str = "auto") -> Model:
    """Load a model; no path loads the embedded default model.

    path: a GGUF file, a Hugging Face folder or a flash store. With `memory_budget`, a GGUF
      or folder is converted once into a store (kept in the models folder) and run from it.
    memory_budget: memory above the interpreter's baseline: bytes, "120MB", "1.5GB" or
      "50%" (of the store). None runs a store fully resident.
    ctx_size: context window in tokens (default min(4096, the model's); 1024 under a budget).
    threads: CPU threads for matrix products (default: all cores).
    codec: store codec when converting: "int8", "int4" or "f16".
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
    """
    if progress is None:
        progress = sys.stderr.isatty()
    if threads is not None:
        if threads < 1:
            raise FlashInferError(f"threads must be at least 1, got {threads}")
        threadpool_limits(limits=threads)
        from numba import set_num_threads
        set_num_threads(min(threads, os.cpu_count() or threads))
    start = time.perf_counter()
    if path is None:
        from .default_model import default_model_path
        path = default_model_path(progress=progress)
    path = Path(path)
    if memory_budget is not None:
        path = ensure_store(path, codec, progress)
    if is_store(path):
        return _load_store(path, memory_budget, ctx_size, verify, start, on_plan, stream_all,
                           (selector, sparsity, window), head)
    if (selector, sparsity, window) != (None, None, None):
        raise FlashInferError("sparsity settings need a calibrated flash store "
                              "(run-model convert MODEL --calibrate)")
    if head != "auto":
        raise FlashInferError("output-layer plans need a flash store (give --memory-budget "
                              "or a store)")
    checkpoint = load_checkpoint(path, progress=progress)
    return Model(checkpoint, ctx_size, time.perf_counter() - start)


def store_path_for(source: Path, codec: str) -> Path:
    """Where the store converted from `source` lives in the models folder; the name carries
    the source's identity (path, size, modification time), so a replaced file is converted
    again rather than served from a stale store."""
    import hashlib

    from .default_model import models_dir
    stat = source.stat()
    identity = f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    tag = hashlib.sha256(identity).hexdigest()[:10]
    return models_dir() / f"{source.name.removesuffix('.gguf')}-{tag}.{codec}.store"


def ensure_store(source: Path, codec: str = "int8", progress: bool = False) -> Path:
    """The store of `source`, converting it the first time. Conversion holds the embeddings
    and a block in float32, so it runs in a child process: this process's memory stays as
    the budget plans it."""
    import subprocess

    if not source.exists():
        raise FlashInferError(f"model not found: {source}")
    if is_store(source):
        return source
    target = store_path_for(source, codec)
    if not is_store(target):
        if progress:
            print(f"converting {source} to a flash store (once)", file=sys.stderr)
        child = subprocess.run(
            [sys.executable, "-m", "flashinfer_ondevice.cli", "convert", str(source), "-o",
             str(target), "--codec", codec], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        if child.returncode != 0:
            lines = child.stderr.strip().splitlines() or ["conversion failed"]
            raise FlashInferError(lines[-1].removeprefix("Error: "))
    return target


# Sparsity runs unasked only where it skips at least this share of the FFN's work (resident)
# or of its pages (under a budget). Measured on Gemma 3 270M at its calibrated 5%: resident
# decode 0.85x dense, and under a 50% budget neuron caches read more than dense streaming
# (255 vs 227 MB/token) at 0.35x its speed (docs/benchmarks.md).
MIN_DEFAULT_SAVING = 0.25


def _sparsity_pays(store: Store, budget: int | None, sparsity: float) -> bool:
    """Whether the calibrated default sparsity saves enough to be used without being asked.
    Under a budget neurons are read in whole pages, and a page is skipped only when none of
    the bundles on it is selected."""
    if budget is None:
        return sparsity >= MIN_DEFAULT_SAVING
    per_page = max(1.0, ALIGN / store.tensors["layers.0.ffn"].row_nbytes)
    return 1.0 - sparsity ** per_page <= 1.0 - MIN_DEFAULT_SAVING


def sparse_settings(store: Store, budget: int | None, selector: str | None,
                    sparsity: float | None, window: int | None) -> SparseSettings | None:
    """The FFN sparsity to run with: the arguments, else the store's calibrated defaults where
    they pay (see _sparsity_pays), else none."""
    record = store.sparsity
    asked = not (selector is None and sparsity is None and window is None)
    if selector == "dense" or (not asked and (
            record is None or not _sparsity_pays(store, budget, record.defaults["sparsity"]))):
        return None
    if record is None:
        raise FlashInferError(f"store {store.path} has no sparsity calibration (convert it "
                              "with run-model convert MODEL --calibrate)")
    if store.tensors["layers.0.ffn"].codec == "f16":
        raise FlashInferError("FFN sparsity runs on int8 or int4 stores; this one is f16")
    if selector is None:
        selector = "gate" if budget is None else record.defaults["selector"]
    if selector not in SELECTORS:
        raise FlashInferError(f"unknown selector {selector!r} (use gate, predicted or dense)")
    sparsity = record.defaults["sparsity"] if sparsity is None else float(sparsity)
    record.target_index(sparsity)
    window = record.defaults["window"] if window is None else int(window)
    if not 1 <= window <= MAX_WINDOW:
        raise FlashInferError(f"window must be within 1..{MAX_WINDOW} tokens, got {window}")
    return SparseSettings(selector, sparsity, window)


def _load_store(path: Path, memory_budget, ctx_size: int | None, verify: bool,
                start: float, on_plan: Callable[[str], None] | None,
                stream_all: bool = False, sparse_args: tuple = (None, None, None),
                head: str = "auto") -> Model:
    from .loader.tokenizer import (
        GGUFTokenizer,
        HFTokenizer,
        LeanGGUFTokenizer,
        _read_json,
        release_freed_memory,
    )

    store = open_store(path, verify=verify)
    transient = 0
    if store.tokenizer["kind"] == "gguf" and memory_budget is not None:
        record = store.tokenizer
        before = current_rss_bytes()
        GGUFTokenizer(path / "tokenizer.gguf")  # measure what encoding will briefly need
        transient = current_rss_bytes() - before
        release_freed_memory()
        pieces = np.fromfile(path / "pieces.bin", dtype=np.uint8)
        offsets = np.fromfile(path / "pieces.idx", dtype="<u4").astype(np.int64)
        tokenizer = LeanGGUFTokenizer(path / "tokenizer.gguf", pieces, offsets,
                                      record.get("bos_id"), record.get("eog_ids", []),
                                      record.get("bos_text", ""))
    elif store.tokenizer["kind"] == "gguf":
        tokenizer = GGUFTokenizer(path / "tokenizer.gguf")
    else:
        tokenizer = HFTokenizer(path, _read_json(path / "config.json") or {})
    limit = store.config.context_length
    ctx = ctx_size or min(limit, DEFAULT_CTX if memory_budget is None else BUDGET_DEFAULT_CTX)
    budget = None if memory_budget is None else parse_budget(memory_budget, store.nbytes)
    sparse = sparse_settings(store, budget, *sparse_args)
    plan = make_plan(store, budget, ctx, max(0, current_rss_bytes() - BASELINE_RSS), transient,
                     stream_all, sparse, head)
    if on_plan is not None:
        on_plan(plan.describe(store))
    reader = DirectReader(path / "weights.bin")
    weights = StreamedWeights(store, plan, reader)
    if isinstance(tokenizer, LeanGGUFTokenizer):
        tokenizer.before_encode = weights.release_io_buffers
    checkpoint = Checkpoint(store.config, weights, tokenizer, store.chat_template, path)
    return Model(checkpoint, ctx, time.perf_counter() - start, plan=plan, reader=reader)
