"""Open a flash store as a running model: validate it, plan its memory under a budget, read
the resident weights, build the tokenizer and the forward pass.

The API (`fi.load`) and the store builders (build/: calibration, the output-layer proxy fit)
open stores through `open_store_session`, so there is one engine behind both. The process's
memory baseline, which every budget is counted above, is taken here on first use
(`process_baseline`), after the kernels and llama.cpp's library are loaded, so that importing
the package does nothing but import.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..backends import BACKENDS, make_backend
from ..backends.base import Backend
from ..config import ModelConfig
from ..errors import ArgumentError, FlashInferError, os_error_line
from ..kv_cache import check_cache_type
from ..loader import spm_encoder
from ..loader.gguf_vocab import check_vocabulary_file
from ..loader.llama_backend import LlamaCppError, llama_cpp_available, load_llama_cpp
from ..loader.tokenizer import (
    GGUFTokenizer,
    HFTokenizer,
    LeanGGUFTokenizer,
    Tokenizer,
    compact_encoder,
    read_json,
)
from ..memory import current_rss_bytes, release_freed_memory
from ..model import Transformer
from ..quant.codecs import CODECS, codec
from ..schema import layer_key
from ..store.format import ALIGN
from ..store.io import DirectReader
from ..store.reader import Store, corrupt, open_store
from ..store.sparsity_record import MAX_WINDOW, SELECTORS
from ..values import describe
from . import store_choice
from .planner import Plan, SparseSettings, make_plan, parse_budget
from .streamed import StreamedWeights

DEFAULT_CTX = 4096
BUDGET_DEFAULT_CTX = 1024  # default context under a memory budget (its KV cache is resident)
# Sparsity runs unasked only where it skips at least this share of the FFN's work (resident)
# or of its pages (under a budget). Measured on Gemma 3 270M at its calibrated 5%: resident
# decode 0.85x dense, and under a 50% budget neuron caches read more than dense streaming
# (255 vs 227 MB/token) at 0.35x its speed (docs/benchmarks.md).
MIN_DEFAULT_SAVING = 0.25


@dataclass
class Session:
    """A model ready to run: tokenizer, forward pass and, from a store, its plan and reader."""

    config: ModelConfig
    tokenizer: Tokenizer
    chat_template: str | None
    engine: Transformer
    ctx_size: int
    path: Path
    plan: Plan | None = None  # memory plan when running from a flash store
    reader: DirectReader | None = None  # its direct-I/O reader (counters in reader.stats)
    weights: StreamedWeights | None = None  # its weights (None for the numpy reference)

    def close(self) -> None:
        """Stop the store's reader threads and close its files (idempotent)."""
        if self.weights is not None:
            self.weights.close()
            self.weights = None


@functools.cache
def process_baseline() -> int:
    """The process's resident memory with the runtime loaded: numpy, the compiled kernels
    (the codecs' and the SentencePiece encoder's) and llama.cpp's library (when installed).
    Budgets count memory above it. Taken once."""
    for known in CODECS.values():
        known.warm_up()
    spm_encoder.warm_up()
    if llama_cpp_available():  # only GGUF tokenizers need it; they report its errors
        with contextlib.suppress(LlamaCppError):
            load_llama_cpp()
    return current_rss_bytes()


def context_size(config: ModelConfig, asked: int | None, default: int) -> int:
    """The context to run with: `asked`, else min(default, the model's), within the model's."""
    limit = config.context_length
    ctx = min(default, limit) if asked is None else asked
    if not 1 <= ctx <= limit:
        raise FlashInferError(f"context size {ctx} is outside 1..{limit}, the model's trained "
                              "context")
    return ctx


def _sparsity_pays(store: Store, budget: int | None, sparsity: float) -> bool:
    """Whether the calibrated default sparsity saves enough to be used without being asked.
    Under a budget neurons are read in whole pages, and a page is skipped only when none of
    the bundles on it is selected."""
    if budget is None:
        return sparsity >= MIN_DEFAULT_SAVING
    per_page = max(1.0, ALIGN / store.tensors[layer_key(0, "ffn")].row_nbytes)
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
    ffn_codec = store.tensors[layer_key(0, "ffn")].codec
    if not codec(ffn_codec).fused:
        raise FlashInferError(f"FFN sparsity needs a codec with fused kernels; this store's "
                              f"FFN is {ffn_codec}")
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


def _tokenizer(store: Store, lean: bool) -> tuple[Tokenizer, int]:
    """The store's tokenizer and the bytes it briefly needs to encode (lean GGUF tokenizers
    encode with the compact SentencePiece encoder where it matches llama.cpp, needing nothing
    more, else load llama.cpp's vocabulary only while encoding, freeing it after). Whether
    it matches is recorded at convert (the tokenizer record's "compact_encoder"); stores
    converted before that load llama.cpp's vocabulary here to check (~0.7 s of each open on
    Gemma 3's 262k tokens)."""
    path, record = store.path, store.tokenizer
    if record["kind"] == "hf":
        return HFTokenizer(path, read_json(path / "config.json") or {}), 0
    n = check_vocabulary_file(path / "tokenizer.gguf")
    if n != store.config.vocab_size:  # llama.cpp would abort on an id past its vocabulary
        raise corrupt(path, f"tokenizer.gguf holds {n} tokens, the model "
                            f"{store.config.vocab_size}")
    if not lean:
        return GGUFTokenizer(path / "tokenizer.gguf"), 0
    checked = record.get("compact_encoder")
    if checked is not None and type(checked) is not bool:
        raise corrupt(path, f"its tokenizer record's compact_encoder is {describe(checked)}, "
                            "not true or false")
    encoder, transient = None, 0
    if checked is True:
        encoder = compact_encoder(path / "tokenizer.gguf", None)
    if encoder is None:
        before = current_rss_bytes()
        reference = GGUFTokenizer(path / "tokenizer.gguf")  # what encoding would briefly need
        transient = current_rss_bytes() - before
        if checked is None:
            encoder = compact_encoder(path / "tokenizer.gguf", reference)
        del reference
        release_freed_memory()
    try:
        pieces = np.fromfile(path / "pieces.bin", dtype=np.uint8)
        offsets = np.fromfile(path / "pieces.idx", dtype="<u4").astype(np.int64)
    except OSError as exc:
        raise corrupt(path, os_error_line(exc)) from None
    bos_id, eog_ids, bos_text = (record.get("bos_id"), record.get("eog_ids", []),
                                 record.get("bos_text", ""))
    if len(offsets) != n + 1 or not (bos_id is None or _token_id(bos_id, n)) or \
            not isinstance(eog_ids, list) or not all(_token_id(t, n) for t in eog_ids) or \
            not isinstance(bos_text, str):
        raise corrupt(path, "its token piece table or special tokens do not fit the "
                            "vocabulary")
    return LeanGGUFTokenizer(path / "tokenizer.gguf", pieces, offsets, bos_id, eog_ids,
                             bos_text, encoder), 0 if encoder is not None else transient


def _token_id(value, n: int) -> bool:
    return type(value) is int and 0 <= value < n


def _same_model(store: Store, paths: Sequence[Path],
                sparse: Callable[[Store], object]) -> list[Store]:
    """The stores at `paths` that hold the same model as `store`, have a quality record and
    can run the asked FFN settings (`sparse` raises otherwise); others, and unreadable or
    corrupt ones, are left out (they never stop the asked store from running)."""
    found = []
    for path in paths:
        try:
            other = open_store(path)
            sparse(other)
        except (FlashInferError, OSError, ValueError, OverflowError):
            continue
        if other.config == store.config and other.path != store.path and \
                other.quality is not None:
            found.append(other)
    return found


@dataclass
class PlannedSession:
    """What opening a store decides before reading a weight: the store (the one the budget
    chose), its tokenizer, the context and the memory plan."""

    store: Store
    tokenizer: Tokenizer
    ctx: int
    plan: Plan
    choice: str  # how the store was chosen among alternatives ("" when there was no choice)


def plan_store_session(path: str | Path, memory_budget: str | int | None = None,
                       ctx_size: int | None = None, verify: bool = False,
                       stream_all: bool = False, selector: str | None = None,
                       sparsity: float | None = None, window: int | None = None,
                       head: str = "auto", quality: str = "auto",
                       alternatives: Sequence[Path] = (),
                       cache_type: str = "f16", backend: Backend | None = None,
                       gpu_memory_budget: str | int | None = None) -> PlannedSession:
    """The plan open_store_session would run with (same arguments), reading no weight: what
    `run-model profile --plan-only` predicts from."""
    check_cache_type(cache_type)
    backend = backend or make_backend()
    check_device_budget(backend.name, gpu_memory_budget)
    if quality not in store_choice.QUALITY_MODES:
        raise FlashInferError(f"unknown quality {quality!r} (use "
                              f"{', '.join(store_choice.QUALITY_MODES)})")
    if quality == "exact" and head == "shortlist":
        raise FlashInferError("--quality exact keeps every logit exact: leave out --head "
                              "shortlist")
    baseline = process_baseline()
    store = open_store(path, verify=verify)
    tokenizer, transient = _tokenizer(store, lean=memory_budget is not None)
    ctx = context_size(store.config, ctx_size,
                       DEFAULT_CTX if memory_budget is None else BUDGET_DEFAULT_CTX)
    budget = None if memory_budget is None else parse_budget(memory_budget, store.nbytes)
    device_budget = None if gpu_memory_budget is None else \
        parse_budget(gpu_memory_budget, store.nbytes, "GPU memory budget")
    release_freed_memory()  # reading the vocabulary leaves freed heap pages (~3.6 MB on Gemma 3)
    overhead = max(0, current_rss_bytes() - baseline)

    def plan_for(s: Store, h: str) -> Plan:
        return make_plan(s, budget, ctx, overhead, transient, stream_all,
                         sparse_settings(s, budget, selector, sparsity, window), h,
                         cache_type=cache_type, backend=backend, device_budget=device_budget)

    choice = ""
    if budget is None or stream_all or quality == "exact" or store.quality is None:
        plan = plan_for(store, "exact" if quality == "exact" else head)  # nothing to weigh
    else:
        stores = [store, *_same_model(store, alternatives, lambda s: sparse_settings(
            s, budget, selector, sparsity, window))]
        found = store_choice.options(stores, head, plan_for)
        chosen = store_choice.choose(found, quality, store)
        choice = store_choice.describe(chosen, found, quality)
        plan = chosen.plan
        if chosen.store is not store:  # same vocabulary: the tokenizer, counted in the
            store = chosen.store       # plan, stays
            if verify:
                open_store(store.path, verify=True)
    return PlannedSession(store, tokenizer, ctx, plan, choice)


def check_device_budget(backend: str, gpu_memory_budget: object) -> None:
    """Refuse a GPU memory budget for a backend (named) without a device tier."""
    if gpu_memory_budget is not None and not (backend in BACKENDS
                                              and BACKENDS[backend].device_tier):
        tiered = ", ".join(n for n, b in BACKENDS.items() if b.device_tier)
        raise ArgumentError(f"a GPU memory budget is for backends that keep weights on the "
                            f"device ({tiered}), not {backend!r}")


def open_store_session(path: str | Path, memory_budget: str | int | None = None,
                       ctx_size: int | None = None, verify: bool = False,
                       on_plan: Callable[[str], None] | None = None, stream_all: bool = False,
                       selector: str | None = None, sparsity: float | None = None,
                       window: int | None = None, head: str = "auto",
                       quality: str = "auto", alternatives: Sequence[Path] = (),
                       backend: Backend | None = None, prepare: bool = False,
                       cache_type: str = "f16",
                       gpu_memory_budget: str | int | None = None) -> Session:
    """A session on the flash store at `path` (the arguments are load()'s, see api.py), or,
    under a budget, on whichever of it and `alternatives` (other stores of the same model)
    `quality` chooses (runtime/store_choice.py). `backend` computes (default: the default
    backend); `prepare` lets it keep resident matrices in its own form, which happens only
    without a budget (the planner counts codec bytes) and unless `quality` is "exact" (its
    forms may round activations). Store builders leave `prepare` off: they read bytes.
    `gpu_memory_budget` (bytes, "1GB" or a percentage of the store): the weights a backend
    with a device tier (mlx) keeps in its device form, as the planner places them; the
    rest stays codec bytes in DRAM or streams."""
    backend = backend or make_backend()
    planned = plan_store_session(path, memory_budget, ctx_size, verify, stream_all, selector,
                                 sparsity, window, head, quality, alternatives, cache_type,
                                 backend, gpu_memory_budget)
    store, tokenizer, ctx, plan, choice = (planned.store, planned.tokenizer, planned.ctx,
                                           planned.plan, planned.choice)
    budget = plan.budget
    if on_plan is not None:
        on_plan(plan.describe(store) + (f"\n{choice}" if choice else ""))
    reader = DirectReader(store.path / "weights.bin")
    try:
        weights = StreamedWeights(store, plan, reader, backend, prepare and budget is None
                                  and plan.device_budget is None and not stream_all
                                  and quality != "exact")
    except BaseException:
        reader.close()
        raise
    if isinstance(tokenizer, LeanGGUFTokenizer):
        tokenizer.before_encode = weights.release_io_buffers
    engine = Transformer(store.config, weights, cache_type=cache_type, backend=backend)
    engine.prefill_batch = plan.prefill_batch
    engine.kv_resident_tokens = plan.kv_resident_tokens
    engine.kv_spill_dir = store.path.parent  # the spill file goes next to the store
    return Session(store.config, tokenizer, store.chat_template, engine, ctx, store.path, plan,
                   reader, weights)
