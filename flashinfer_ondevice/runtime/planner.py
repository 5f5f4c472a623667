"""The residency planner: given a memory budget, decide what stays in DRAM and what streams.

Budget = bytes of memory above the process's baseline (its RSS with the runtime loaded,
runtime/engine.py's process_baseline). Always resident: norms, biases, the KV cache for the
context, logits and sampling scratch, and the ring of I/O buffers streaming reads through (none when
every weight fits; deeper than two only when that costs little, see _ring_size).
Then, most valuable first, as long as they fit: each layer's attention matrices, each layer's
FFN bundles, then a prefix of the output layer's rows (62% of Gemma 3). Everything else is
read from the store every token, so bytes streamed per token = store size - resident size.
Input embedding rows are always read on demand.

Run memory has one owner per buffer: the code that allocates a buffer also says how large it
is (KVCache.planned_nbytes, units.unit_capacity, NeuronCache.planned_nbytes,
ShortlistHead.planned_nbytes, selectors.*_nbytes, sampling.scratch_nbytes), and the planner
asks it instead of re-deriving sizes. `Plan.ledger` lists the result per component; the
runtime allocates exactly the sizes the plan holds (tests/test_ledger.py checks both agree).

When the output layer does not fit and the store has its low-rank proxy, the head gets a
*shortlist* plan instead (runtime/shortlist_head.py): the proxy is resident, scores every
token, and only the best `shortlist` candidates' rows are read exactly (those not among the
resident prefix). The output layer then never streams whole; its logits are exact for the
candidates and approximate elsewhere (quality: docs/benchmarks.md). `head="exact"` keeps the
exact plan; `head="shortlist"` asks for the shortlist even when everything fits (less compute).

A backend that keeps resident weights in a device form of its own (the mlx backend:
MLX arrays, on a GPU where there is one) gets a third tier above DRAM when given a device
budget (--gpu-memory-budget): each resident tensor goes to the device form while the
device budget holds it (the bytes the backend says that form takes), else stays as codec
bytes in DRAM; what does not fit either streams. Where the device form lives in the
process's own memory (MLX on its CPU device, Apple silicon's unified memory) it counts
against the memory budget too. The backend's conversion buffers (`staging_nbytes`) are
run memory like the I/O ring.

With activation sparsity (a selector), FFNs never stream whole: each layer computes only the
neurons its selector picks, from a windowed neuron cache of `cache_rows` bundles that reads
what it lacks. The selector's data (predictors, or gate rows for gate-first) is resident,
then attention, then the caches (all rows if they fit), then output-layer rows.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from ..backends.base import Backend
from ..config import ModelConfig
from ..errors import ArgumentError, FlashInferError
from ..kv_cache import MIN_RESIDENT, KVCache
from ..kv_spill import BLOCK
from ..model import prefill_nbytes
from ..quant.codecs import codec
from ..sampling import scratch_nbytes
from ..schema import LAYER_MATRICES, layer_key
from ..store.format import align_up
from ..store.reader import Store, TensorEntry
from ..store.vocab_tiers import COLD
from ..values import describe, number
from . import neuron_cache, shortlist_head
from .head_rows import HeadRows
from .neuron_cache import NeuronCache
from .selectors import gate_rows_nbytes, predictor_dram_nbytes
from .shortlist_head import ShortlistHead
from .units import OUTPUT_CHUNK, head_chunk, unit_capacity

BUFFERS = (6, 4, 3, 2)  # streaming ring sizes to try: one unit computing, the others reading
MARGIN = 8 << 20  # Python objects, allocator slack
PREFILL_BATCHES = (512, 256, 128, 64, 32, 16)  # prompt tokens per forward pass, largest first
PREFILL_SHARE = 8  # a prompt batch may hold up to 1/8 of the budget (but at least the
# smallest batch's bytes): larger batches buy prompt speed, not decode speed
MIN_CACHE_ROWS = 64  # fewer cached neurons per layer than this is not worth planning
HEAD_PLANS = ("auto", "exact", "shortlist")
MAX_BUDGET = float(1 << 50)  # bytes: a memory budget beyond this is a typo
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "kib": 1024, "mib": 1 << 20, "gib": 1 << 30}


class BudgetError(FlashInferError):
    """The memory budget cannot hold what must stay resident; `smallest` is what would."""

    def __init__(self, message: str, smallest: int):
        super().__init__(message)
        self.smallest = smallest


def parse_budget(text: str | int | float, store_bytes: int, name: str = "memory budget") -> int:
    """Bytes from 123456, "120MB", "1.5GB", "512MiB" or "50%" (of the store); `name` says
    which budget in errors."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return int(number(text, name, 0.0, MAX_BUDGET, error=ArgumentError))
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%|[a-zA-Z]*)\s*", text) \
        if isinstance(text, str) and len(text) < 64 else None
    if not match or (match.group(2) != "%" and match.group(2).lower() not in _UNITS):
        raise ArgumentError(f"invalid {name} {describe(text)} (use bytes, e.g. 120MB, "
                            "1.5GB, or a percentage of the store, e.g. 50%)")
    value, unit = float(match.group(1)), match.group(2)
    nbytes = store_bytes * value / 100 if unit == "%" else value * _UNITS[unit.lower()]
    return int(number(nbytes, f"{name} {text.strip()}", 0.0, MAX_BUDGET,
                      error=ArgumentError))


@dataclass(frozen=True)
class SparseSettings:
    selector: str  # "gate" (exact, gate rows resident) or "predicted" (low-rank predictor)
    sparsity: float  # calibrated target fraction of neurons skipped
    window: int  # tokens whose neurons the caches keep

    def describe(self) -> str:
        return (f"{self.selector} selector, {self.sparsity:.0%} target sparsity, "
                f"window {self.window}")


@dataclass
class Plan:
    budget: int | None
    head: str  # tensor holding the output layer ("embed" when tied, else "output")
    resident: set[str] = field(default_factory=set)  # whole tensors kept in DRAM
    head_resident_rows: int = 0  # rows of the output layer kept resident (the first ones)
    head_device_rows: int = 0  # of those, the first ones in the backend's device form
    kv_bytes: int = 0  # the KV cache, full (KVCache.planned_nbytes)
    kv_resident_tokens: int | None = None  # positions each global layer keeps in DRAM when
    # its KV spills to flash (kv_spill.py); None: every position stays
    cache_type: str = "f16"  # the KV cache's type (kv_cache.CACHE_TYPES)
    scratch_bytes: int = 0  # a decode step's logits, sampling and activations (transient)
    buffer_bytes: int = 0
    buffers: int = 0  # size of the streaming ring
    buffer_unit: int = 0  # bytes of one ring buffer (units.unit_capacity)
    head_chunk: int = OUTPUT_CHUNK  # bytes of output-layer rows one unit holds (units.py)
    overhead_bytes: int = 0  # already in use above baseline when planning (tokenizer, ...)
    transient_bytes: int = 0  # briefly needed outside generation (loading the vocabulary)
    fixed_bytes: int = 0  # everything but resident weights: the smallest workable budget
    resident_bytes: int = 0
    streamed_bytes: int = 0  # read from the store per token
    sparse: SparseSettings | None = None
    selector_bytes: int = 0  # predictors or gate rows (sparse)
    cache_rows: int = 0  # neurons per layer the neuron caches hold (sparse, under a budget)
    cache_bytes: int = 0  # the neuron caches and the buffers they share
    shortlist: int = 0  # output-layer candidates read exactly per position; 0: exact head
    shortlist_bytes: int = 0  # ShortlistHead.planned_nbytes: proxy, candidate rows, scratch
    ring_scratch: bool = False  # the candidates' pages are read into a free ring buffer
    weight_bytes: int = 0  # resident tensors and output-layer rows
    prefill_batch: int = PREFILL_BATCHES[0]  # prompt tokens per forward pass
    prefill_bytes: int = 0  # what one such pass holds at the full context (prefill_nbytes)
    device_budget: int | None = None  # bytes of weights the backend may keep in its device
    # form; None: no device tier
    device: set[str] = field(default_factory=set)  # resident tensors in that form
    device_bytes: int = 0  # their bytes in that form (Backend.device_nbytes)
    device_shares_host: bool = True  # the device form is in the process's memory
    staging_bytes: int = 0  # the backend's conversion buffers (Backend.staging_nbytes)

    @property
    def ledger(self) -> dict[str, int]:
        """Planned bytes of each part of run memory above the baseline ("device weights" in
        device memory when that is not the process's, see `device_shares_host`)."""
        return {"resident weights": self.weight_bytes, "device weights": self.device_bytes,
                "backend staging": self.staging_bytes, "KV cache": self.kv_bytes,
                "I/O ring": self.buffer_bytes, "shortlist head": self.shortlist_bytes,
                "selectors": self.selector_bytes, "neuron caches": self.cache_bytes,
                "scratch": self.scratch_bytes, "prefill": self.prefill_bytes,
                "margin": MARGIN,
                "tokenizer and runtime": self.overhead_bytes}

    @property
    def ffn_cached(self) -> bool:
        """FFNs run from neuron caches that read from the store (sparse, under a budget)."""
        return self.sparse is not None and self.budget is not None

    def describe(self, store: Store) -> str:
        mb = 1e6
        budget = "unlimited" if self.budget is None else f"{self.budget / mb:.1f} MB"
        total = sum(e.nbytes for e in store.tensors.values())
        head = (f"output layer {self.head_resident_rows} of "
                f"{HeadRows.of(store, self.head).rows} "
                "rows" + ("" if not self.head_device_rows else
                          f", the first {self.head_device_rows} in the device form")
                + ("" if not self.shortlist else
                   f"; shortlist: proxy {self.shortlist_bytes / mb:.1f} MB scores every "
                   f"token, the best {self.shortlist} are computed exactly"))
        return (f"memory plan: budget {budget} above baseline; store {total / mb:.1f} MB\n"
                + self._device_line()
                + f"  resident {(self.resident_bytes - self.device_bytes) / mb:7.1f} MB "
                f"(weights, proxy, caches; {head})\n"
                f"  KV cache ({self.cache_type}) {self.kv_bytes / mb:.1f} MB, I/O buffers "
                f"{self.buffer_bytes / mb:.1f} MB, "
                + ("" if not self.staging_bytes else
                   f"backend staging {self.staging_bytes / mb:.1f} MB, ")
                + f"scratch {self.scratch_bytes / mb:.1f} MB, "
                f"prompt batches of {self.prefill_batch} tokens "
                f"{self.prefill_bytes / mb:.1f} MB, tokenizer and runtime "
                f"{self.overhead_bytes / mb:.1f} MB"
                + ("" if not self.transient_bytes else
                   f" (+{self.transient_bytes / mb:.1f} MB while encoding)") + "\n"
                + ("" if self.kv_resident_tokens is None else
                   f"  KV spill: global layers keep their last {self.kv_resident_tokens} "
                   "positions in DRAM, older ones are written to flash and read back "
                   "each token\n")
                + f"  streamed per token {self.streamed_bytes / mb:7.1f} MB"
                + ("" if not self.shortlist else
                   f" + up to {self.shortlist} output-layer rows")
                + ("" if self.sparse is None else
                   f"\n  FFN: {self.sparse.describe()}; selector data "
                   f"{self.selector_bytes / mb:.1f} MB, "
                   + ("all neurons resident" if not self.cache_rows else
                      f"neuron caches of {self.cache_rows} of {store.config.ffn_size} neurons "
                      "per layer, the rest read on demand" + self._cache_warning(store))))

    def _device_line(self) -> str:
        """The device tier: what the backend keeps in its own form, and where that lives."""
        if self.device_budget is None:
            return ""
        where = ("in this process's memory, counted in the budget" if self.device_shares_host
                 else "device memory")
        head = "" if not self.head_device_rows else \
            f" and {self.head_device_rows} output-layer rows"
        return (f"  device   {self.device_bytes / 1e6:7.1f} MB ({len(self.device)} weight "
                f"tensors{head} in the backend's form, of up to "
                f"{self.device_budget / 1e6:.1f} MB; {where})\n")

    def _cache_warning(self, store: Store) -> str:
        """A note when a token's neurons (at the target sparsity) outnumber the cache's."""
        needed = round((1 - self.sparse.sparsity) * store.config.ffn_size)
        if self.cache_rows >= needed:
            return ""
        return (f"\n  note: a token needs about {needed} neurons per layer, more than the "
                "caches hold, so most are read every token (dense streaming may read less)")


def _prefill_batch(config: ModelConfig, ctx: int, budget: int, spare: int,
                   spill: bool) -> int:
    """The largest prompt batch whose pass fits in 1/PREFILL_SHARE of the budget and in
    `spare` more bytes than the smallest batch's, else the smallest: a long prompt needs no
    more memory than a short one, and the smallest workable budget stays workable."""
    smallest = prefill_nbytes(config, PREFILL_BATCHES[-1], ctx, spill)
    for batch in PREFILL_BATCHES:
        nbytes = prefill_nbytes(config, batch, ctx, spill)
        if nbytes <= budget // PREFILL_SHARE and nbytes - smallest <= spare:
            return batch
    return PREFILL_BATCHES[-1]


def _ring_size(budget: int, fixed: Callable[[int], int], weights: int, buffer: int,
               stream_all: bool) -> int:
    """Streaming ring size: none if every weight fits; else the deepest ring whose extra
    buffers (beyond two) cost at most a tenth of what then streams per token, since each
    byte of buffer is a byte less of resident weights. `fixed(depth)`: the memory everything
    but the weights needs with a ring that deep."""
    if not stream_all and fixed(0) + weights <= budget:
        return 0
    streamed_with_two = weights - max(0, budget - fixed(2)) * (not stream_all)
    for depth in sorted(BUFFERS, reverse=True):
        extra = (depth - 2) * buffer
        if fixed(depth) <= budget and extra <= streamed_with_two / 10:
            return depth
    return min(BUFFERS)


def selector_bytes(store: Store, sparse: SparseSettings, ffn_resident: bool) -> int:
    """DRAM the selectors take: float32 predictors, or gate rows unless the FFN is resident."""
    config = store.config
    if sparse.selector == "predicted":
        return config.n_layers * predictor_dram_nbytes(config.hidden_size, config.ffn_size,
                                                  store.sparsity.rank)
    if ffn_resident:
        return 0
    return sum(gate_rows_nbytes(store.tensors[layer_key(i, "ffn")])
               for i in range(config.n_layers))


def make_plan(store: Store, budget: int | None, ctx: int, overhead: int,
              transient: int = 0, stream_all: bool = False,
              sparse: SparseSettings | None = None, head: str = "auto",
              candidates: int = shortlist_head.CANDIDATES, cache_type: str = "f16",
              backend: Backend | None = None, device_budget: int | None = None) -> Plan:
    """`overhead`: bytes above baseline in use now; `transient`: bytes needed briefly while
    no generation runs (encoding a prompt loads the vocabulary), sharing the room that the
    KV cache, scratch and margin take during generation. `stream_all` keeps no weight
    resident (the naive baseline of the benchmarks: every weight read every token).
    `head`: the output layer's plan, "exact", "shortlist" or "auto" (shortlist when the
    output layer does not fit and the store has a proxy), computing `candidates` rows exactly.
    `cache_type`: the KV cache's type (kv_cache.CACHE_TYPES), which sets its bytes.
    `backend`: what will compute (its conversion buffers and device form are counted; None:
    one that keeps nothing but codec bytes); `device_budget`: bytes of weights it may keep
    in its device form (None: no device tier)."""
    if head not in HEAD_PLANS:
        raise FlashInferError(f"unknown output-layer plan {head!r} (use {', '.join(HEAD_PLANS)})")
    if head == "shortlist" and store.head_proxy is None:
        raise FlashInferError(f"store {store.path} has no output-layer proxy (convert the "
                              "model again with this version)")
    args = (store, budget, ctx, overhead, transient, stream_all, sparse, cache_type,
            backend or Backend(), device_budget)
    if head == "exact" or store.head_proxy is None or stream_all:
        return _make_plan(*args, 0)
    if head == "shortlist":
        return _make_plan(*args, candidates)
    try:
        exact = _make_plan(*args, 0)
    except BudgetError as exact_error:
        try:
            return _make_plan(*args, candidates)
        except BudgetError as error:  # name the smaller of the two smallest budgets
            raise min(exact_error, error, key=lambda e: e.smallest) from None
    if exact.head_resident_rows < HeadRows.of(store, exact.head).rows:
        try:
            return _make_plan(*args, candidates)
        except BudgetError:  # the proxy itself does not fit: stream the output layer
            pass
    return exact


class _UnitTooSmall(Exception):
    """A ring buffer sized from a guess cannot hold what then streams."""


def _make_plan(store: Store, budget: int | None, ctx: int, overhead: int, transient: int,
               stream_all: bool, sparse: SparseSettings | None, cache_type: str,
               backend: Backend, device_budget: int | None, shortlist: int) -> Plan:
    """The plan with the whole KV cache in DRAM; when that does not fit, global layers keep
    MIN_RESIDENT positions and spill older ones to flash (kv_spill.py), and what that frees
    goes to weights first: a resident weight byte saves a read every token, a resident KV
    byte only once the context has grown past it (and never more than one). Positions are
    added back while no weight has to leave for them. Refused only when even MIN_RESIDENT
    positions do not fit."""
    args = (store, budget, ctx, overhead, transient, stream_all, sparse, cache_type, backend,
            device_budget, shortlist)
    try:
        return _fit(*args, kv_resident=None)
    except BudgetError:
        if budget is None or KVCache.planned_nbytes(store.config, ctx, cache_type) <= \
                KVCache.planned_nbytes(store.config, ctx, cache_type, MIN_RESIDENT):
            raise  # spilling would not make the cache smaller
    plan = _fit(*args, kv_resident=MIN_RESIDENT)  # raises naming the smallest budget
    low, high = MIN_RESIDENT // BLOCK, -(-ctx // BLOCK) - 1  # blocks kept; low is free
    while low < high:
        middle = (low + high + 1) // 2
        try:
            larger = _fit(*args, kv_resident=middle * BLOCK)
        except BudgetError:
            larger = None
        if larger is not None and larger.resident_bytes >= plan.resident_bytes:
            plan, low = larger, middle
        else:
            high = middle - 1
    return plan


def _fit(store: Store, budget: int | None, ctx: int, overhead: int, transient: int,
         stream_all: bool, sparse: SparseSettings | None, cache_type: str, backend: Backend,
         device_budget: int | None, shortlist: int, kv_resident: int | None) -> Plan:
    """The ring's buffers must hold the largest unit that streams, which depends on what
    stays resident, which depends on the ring. First pass: buffers sized for a whole layer;
    second: sized for what the first pass streams (kept if it fits and streams no more)."""
    args = (store, budget, ctx, overhead, transient, stream_all, sparse, cache_type, backend,
            device_budget, shortlist, kv_resident)
    first = _place(*args, unit_hint=None)
    if budget is None or not first.buffers or stream_all:
        return first
    try:
        second = _place(*args, unit_hint=first.buffer_unit)
    except _UnitTooSmall:
        return first
    return second if second.streamed_bytes <= first.streamed_bytes else first


def _place(store: Store, budget: int | None, ctx: int, overhead: int, transient: int,
           stream_all: bool, sparse: SparseSettings | None, cache_type: str, backend: Backend,
           device_budget: int | None, shortlist: int, kv_resident: int | None,
           unit_hint: int | None) -> Plan:
    """One placement; `unit_hint`: the ring buffer's size (else one fitting any layer);
    `kv_resident`: positions a global layer's KV keeps in DRAM (None: all)."""
    config = store.config
    head = "embed" if config.tie_embeddings else "output"
    tensors = store.tensors
    head_rows = HeadRows.of(store, head)
    index_bytes = head_rows.index_nbytes
    vectors = {n for n, e in tensors.items() if e.codec == "f32"}
    attention = [[layer_key(i, f) for f in LAYER_MATRICES] for i in range(config.n_layers)]
    ffn = [[layer_key(i, "ffn")] for i in range(config.n_layers)]
    ffn_entry = tensors[layer_key(0, "ffn")]
    plan = Plan(budget, head,
                kv_bytes=KVCache.planned_nbytes(config, ctx, cache_type, kv_resident),
                kv_resident_tokens=kv_resident, cache_type=cache_type,
                scratch_bytes=scratch_nbytes(config.vocab_size), overhead_bytes=overhead,
                transient_bytes=transient, sparse=sparse, shortlist=shortlist,
                device_budget=device_budget, device_shares_host=backend.device_shares_host,
                staging_bytes=backend.staging_nbytes(largest_matrix(store)))
    if shortlist:
        plan.shortlist_bytes = ShortlistHead.planned_nbytes(store.head_proxy, tensors[head],
                                                            shortlist, own_scratch=True)
    plan.resident |= vectors
    ffn_cached = sparse is not None and budget is not None
    units = attention if ffn_cached else attention + ffn
    if sparse is not None:
        plan.selector_bytes = selector_bytes(store, sparse, ffn_resident=budget is None)
    tiers = _Tiers(tensors, backend, device_budget, sparse is not None)
    if budget is None:
        plan.prefill_bytes = prefill_nbytes(config, plan.prefill_batch, ctx, False)
        for names in units:
            tiers.place(names, plan, None)
        plan.head_resident_rows = head_rows.rows
        if not shortlist:
            tiers.place_head_rows(head_rows.tiers[0], plan, None)
    else:
        # a layer streams as one unit: its attention (and FFN unless cached) read together
        layer_units = [attention[i] + ([] if ffn_cached else ffn[i])
                       for i in range(config.n_layers)]
        plan.buffer_unit = unit_hint or align_up(_unit_capacity(
            tensors, layer_units, head_rows, shortlist, head_chunk(layer_units)))
        caches_fixed = caches_per_row = 0
        if ffn_cached:  # every layer's cache, and the read scratch and spill rows they share
            caches_fixed = config.n_layers * NeuronCache.planned_nbytes(ffn_entry, 0) \
                + neuron_cache.shared_nbytes(ffn_entry)
            caches_per_row = config.n_layers * (NeuronCache.planned_nbytes(ffn_entry, 1)
                                                - NeuronCache.planned_nbytes(ffn_entry, 0))
        min_caches = caches_fixed + MIN_CACHE_ROWS * caches_per_row
        # Generation needs the KV cache, scratch and I/O buffers; encoding a prompt needs the
        # vocabulary instead, while the I/O buffers' pages and the shortlist's scores and read
        # pages are released (StreamedWeights.release_io_buffers), so the two share that room.
        # prompts in the smallest batches first; larger below, where the budget has room
        plan.prefill_batch = PREFILL_BATCHES[-1]
        spill = kv_resident is not None
        plan.prefill_bytes = prefill_nbytes(config, plan.prefill_batch, ctx, spill)
        generation = plan.kv_bytes + plan.scratch_bytes + plan.prefill_bytes + MARGIN
        encoding = transient + MARGIN // 2
        # everything but the weights, the ring and the shortlist head (which depends on it)
        base = overhead + sum(tensors[n].nbytes for n in vectors) + generation + min_caches \
            + plan.selector_bytes + plan.staging_bytes + index_bytes
        weights = sum(e.nbytes for n, e in tensors.items() if n not in vectors
                      and n != ("output" if head == "embed" else "embed")
                      and not (shortlist and n == head))
        if ffn_cached:  # FFNs go to the neuron caches, never through the ring
            weights -= sum(tensors[n].nbytes for (n,) in ffn)
        # with sparsity, no ring only if the caches can also hold every neuron (at what a
        # cache row costs, beyond the minimum caches already in `base`)
        all_weights = weights if not ffn_cached else \
            weights + (config.ffn_size - MIN_CACHE_ROWS) * caches_per_row
        if plan.device_shares_host:  # what the device form costs beyond the codec bytes
            all_weights += tiers.device_extra(units)

        def uses_ring_scratch(depth: int, unit: int) -> bool:
            """The shortlist reads its candidates into a free ring buffer (no own scratch)."""
            return bool(shortlist and not ffn_cached and depth
                        and unit >= shortlist_head.RING_SCRATCH)

        def peak(depth: int, unit: int) -> int:
            """Fixed memory with a ring of `depth` buffers of `unit` bytes: generation's,
            or encoding's where that is more (it reuses the ring's and shortlist's room)."""
            own = not uses_ring_scratch(depth, unit)
            head_bytes = 0 if not shortlist else ShortlistHead.planned_nbytes(
                store.head_proxy, tensors[head], shortlist, own_scratch=own)
            released = 0 if not shortlist else \
                ShortlistHead.released_nbytes(store.head_proxy, own)
            ring = depth * unit
            return base + head_bytes + ring + max(0, encoding - generation - ring - released)

        smallest = peak(min(BUFFERS), plan.buffer_unit)
        batch = _prefill_batch(config, ctx, budget, budget - smallest, spill)
        if batch != plan.prefill_batch:  # costs at most the difference more (peak is monotone)
            extra = prefill_nbytes(config, batch, ctx, spill) - plan.prefill_bytes
            plan.prefill_batch, plan.prefill_bytes = batch, plan.prefill_bytes + extra
            generation += extra
            base += extra
        plan.buffers = _ring_size(budget, lambda depth: peak(depth, plan.buffer_unit),
                                  all_weights, plan.buffer_unit, stream_all)
        fixed = peak(plan.buffers, plan.buffer_unit)
        plan.fixed_bytes = smallest  # with the smallest prompt batch: the smallest budget
        if fixed > budget:
            kv = f"KV cache {plan.kv_bytes / 1e6:.1f} MB" + (
                "" if not spill else f" with global layers keeping the last {kv_resident} "
                "positions in DRAM and spilling older ones to flash")
            raise BudgetError(
                f"memory budget {budget / 1e6:.1f} MB is too small: the smallest that works "
                f"with a {ctx}-token context is {plan.fixed_bytes / 1e6:.1f} MB above baseline "
                f"({kv}: a smaller -c"
                + (" or --cache-type q8" if cache_type != "q8" else "") + " lowers it)",
                plan.fixed_bytes)
        room = 0 if stream_all else budget - fixed
        for names in [] if stream_all else units:
            room = tiers.place(names, plan, room)
        if plan.buffers and not stream_all:  # buffers need hold only what really streams
            streamed = [[n for n in names if n not in plan.resident] for names in layer_units]
            plan.head_chunk = head_chunk(streamed)
            unit = align_up(_unit_capacity(tensors, streamed, head_rows, shortlist,
                                           plan.head_chunk))
            if unit > plan.buffer_unit:
                raise _UnitTooSmall
            depth = plan.buffers if unit else 0  # nothing streams (shortlist plan): no ring
            room += fixed - peak(depth, unit)
            plan.buffers, plan.buffer_unit = depth, unit
        plan.ring_scratch = uses_ring_scratch(plan.buffers, plan.buffer_unit)  # shortlist_head
        if shortlist:
            plan.shortlist_bytes = ShortlistHead.planned_nbytes(
                store.head_proxy, tensors[head], shortlist, own_scratch=not plan.ring_scratch)
        plan.buffer_bytes = plan.buffers * plan.buffer_unit
        if ffn_cached:
            room += min_caches - caches_fixed
            plan.cache_rows = min(config.ffn_size, max(0, room) // caches_per_row)
            plan.cache_bytes = caches_fixed + plan.cache_rows * caches_per_row
            room -= plan.cache_bytes - caches_fixed
        if not shortlist:  # the shortlist reads its candidate rows as codec bytes
            room = tiers.place_head_rows(head_rows.tiers[0], plan, max(0, room))
        plan.head_resident_rows = plan.head_device_rows + head_rows.fitting(
            plan.head_device_rows, max(0, room))
    plan.weight_bytes = sum(tensors[n].nbytes for n in plan.resident - plan.device) \
        + head_rows.nbytes(plan.head_device_rows, plan.head_resident_rows) + index_bytes
    plan.resident_bytes = plan.weight_bytes + plan.device_bytes + plan.shortlist_bytes \
        + plan.cache_bytes
    streamed = [n for n in tensors if n not in plan.resident
                and n not in ("embed", "output", COLD)
                and not (plan.cache_rows and n.endswith(".ffn"))]
    plan.streamed_bytes = sum(tensors[n].nbytes for n in streamed)
    if not shortlist:
        plan.streamed_bytes += head_rows.nbytes(plan.head_resident_rows, head_rows.rows)
    return plan


class _Tiers:
    """Places resident tensors: in the backend's device form while the device budget holds
    them, else as codec bytes in DRAM (plan.resident; plan.device for the former)."""

    def __init__(self, tensors: dict[str, TensorEntry], backend: Backend,
                 device_budget: int | None, sparse: bool):
        self.tensors, self.backend, self.sparse = tensors, backend, sparse
        self.device_room = 0 if device_budget is None else device_budget
        self.shares_host = backend.device_shares_host

    def device_nbytes(self, name: str) -> int | None:
        """Bytes of `name` in the device form; None where the backend keeps none (a sparse
        plan's FFN bundles are read as bytes by the selectors and caches)."""
        e = self.tensors[name]
        if not name.endswith(".ffn"):
            return self.backend.device_nbytes(codec(e.codec), e.rows, e.cols)
        return None if self.sparse else \
            self.backend.ffn_device_nbytes(codec(e.codec), e.rows, e.cols)

    def _split(self, names: list[str], device_room: int) -> tuple[list[str], int]:
        """The tensors of a unit the device budget takes, and their device bytes."""
        on_device, nbytes = [], 0
        for name in names:
            size = self.device_nbytes(name)
            if size is not None and nbytes + size <= device_room:
                on_device.append(name)
                nbytes += size
        return on_device, nbytes

    def place(self, names: list[str], plan: Plan, room: int | None) -> int | None:
        """Make the unit `names` resident if it fits `room` bytes of DRAM (None: any), its
        tensors in the device form while the device budget lasts; the DRAM left."""
        on_device, device_bytes = self._split(names, self.device_room)
        in_dram = sum(self.tensors[n].nbytes for n in names if n not in on_device)
        host = in_dram + (device_bytes if self.shares_host else 0)
        if room is not None and host > room:  # the device form costs more DRAM: bytes
            on_device, device_bytes = [], 0
            host = sum(self.tensors[n].nbytes for n in names)
            if host > room:
                return room
        plan.resident |= set(names)
        plan.device |= set(on_device)
        plan.device_bytes += device_bytes
        self.device_room -= device_bytes
        return None if room is None else room - host

    def place_head_rows(self, entry: TensorEntry, plan: Plan, room: int | None) -> int | None:
        """Put the output layer's first rows in the device form, as many as the device budget
        (and `room` bytes of DRAM where the device form is the process's memory) holds: its
        largest tensor, placed after every layer; the DRAM left."""
        per_row = self.backend.device_nbytes(codec(entry.codec), 1, entry.cols)
        if per_row is None or self.device_room < per_row:
            return room
        rows = min(entry.rows, self.device_room // per_row)
        if room is not None and self.shares_host:
            rows = min(rows, room // per_row)
        nbytes = self.backend.device_nbytes(codec(entry.codec), rows, entry.cols)
        plan.head_device_rows = rows
        plan.device_bytes += nbytes
        self.device_room -= nbytes
        return None if room is None else room - (nbytes if self.shares_host else 0)

    def device_extra(self, units: list[list[str]]) -> int:
        """DRAM the device form would take beyond the codec bytes were every unit resident."""
        room, extra = self.device_room, 0
        for names in units:
            on_device, nbytes = self._split(names, room)
            room -= nbytes
            extra += nbytes - sum(self.tensors[n].nbytes for n in on_device)
        return extra


def largest_matrix(store: Store) -> int:
    """Bytes of the store's largest weight matrix (what sizes a backend's staging)."""
    return max(e.nbytes for e in store.tensors.values() if e.codec != "f32")


def _unit_capacity(tensors: dict[str, TensorEntry], layer_units: list[list[str]],
                   head: HeadRows, shortlist: int, chunk: int) -> int:
    """units.unit_capacity for these layer units (empty ones never stream) and the output
    layer's chunks of `chunk` bytes (none under a shortlist plan)."""
    layers = [[tensors[n] for n in names] for names in layer_units if names]
    return unit_capacity(layers, [] if shortlist else list(head.tiers), chunk)
