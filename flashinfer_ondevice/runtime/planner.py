"""The residency planner: given a memory budget, decide what stays in DRAM and what streams.

Budget = bytes of memory above the interpreter's baseline (the RSS after
`import flashinfer_ondevice`). Always resident: norms, biases, the KV cache for the context,
logits and sampling scratch, and the ring of I/O buffers streaming reads through (none when
every weight fits; deeper than two only when that costs little, see _ring_size).
Then, most valuable first, as long as they fit: each layer's attention matrices, each layer's
FFN bundles, then a prefix of the output layer's rows (62% of Gemma 3). Everything else is
read from the store every token, so bytes streamed per token = store size - resident size.
Input embedding rows are always read on demand.

When the output layer does not fit and the store has its low-rank proxy, the head gets a
*shortlist* plan instead (runtime/shortlist_head.py): the proxy is resident, scores every
token, and only the best `shortlist` candidates' rows are read exactly (those not among the
resident prefix). The output layer then never streams whole; its logits are exact for the
candidates and approximate elsewhere (quality: docs/benchmarks.md). `head="exact"` keeps the
exact plan; `head="shortlist"` asks for the shortlist even when everything fits (less compute).

With activation sparsity (a selector), FFNs never stream whole: each layer computes only the
neurons its selector picks, from a windowed neuron cache of `cache_rows` bundles that reads
what it lacks. The selector's data (predictors, or gate rows for gate-first) is resident,
then attention, then the caches (all rows if they fit), then output-layer rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..config import ModelConfig
from ..errors import FlashInferError
from ..store.format import align_up, layer_key
from ..store.head_proxy import SCORES
from ..store.reader import Store

OUTPUT_CHUNK = 4 << 20  # bytes of output-layer rows streamed as one unit
BUFFERS = (6, 4, 3, 2)  # streaming ring sizes to try: one unit computing, the others reading
MARGIN = 12 << 20  # prefill activations, Python objects, allocator slack
NEURON_SCRATCH = 4 << 20  # aligned buffer the neuron caches read pages into
NEURON_SPILL = 4 << 20  # rows a token's neurons beyond a cache's capacity are read into
MIN_CACHE_ROWS = 64  # fewer cached neurons per layer than this is not worth planning
SHORTLIST = 1024  # output-layer candidates computed exactly per position (shortlist plan)
SHORTLIST_SCRATCH = 4 << 20  # aligned buffer the candidates' pages are read through
RING_SCRATCH = 1 << 20  # a ring buffer this large serves as that buffer instead
HEAD_PLANS = ("auto", "exact", "shortlist")
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "kib": 1024, "mib": 1 << 20, "gib": 1 << 30}


class BudgetError(FlashInferError):
    """The memory budget cannot hold what must stay resident; `smallest` is what would."""

    def __init__(self, message: str, smallest: int):
        super().__init__(message)
        self.smallest = smallest


def parse_budget(text: str | int | float, store_bytes: int) -> int:
    """Bytes from 123456, "120MB", "1.5GB", "512MiB" or "50%" (of the store)."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%|[a-zA-Z]*)\s*", str(text))
    if not match or (match.group(2) != "%" and match.group(2).lower() not in _UNITS):
        raise FlashInferError(f"invalid memory budget '{text}' (use bytes, e.g. 120MB, 1.5GB, "
                              "or a percentage of the store, e.g. 50%)")
    value, unit = float(match.group(1)), match.group(2)
    if unit == "%":
        return int(store_bytes * value / 100)
    return int(value * _UNITS[unit.lower()])


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
    head_resident_rows: int = 0  # rows of the output layer kept in DRAM
    kv_bytes: int = 0
    scratch_bytes: int = 0
    buffer_bytes: int = 0
    buffers: int = 0  # size of the streaming ring
    buffer_unit: int = 0  # bytes of one ring buffer (the largest streamed unit, aligned)
    overhead_bytes: int = 0  # already in use above baseline when planning (tokenizer, ...)
    transient_bytes: int = 0  # briefly needed outside generation (loading the vocabulary)
    fixed_bytes: int = 0  # everything but resident weights: the smallest workable budget
    resident_bytes: int = 0
    streamed_bytes: int = 0  # read from the store per token
    sparse: SparseSettings | None = None
    selector_bytes: int = 0  # predictors or gate rows (sparse)
    cache_rows: int = 0  # neurons per layer the neuron caches hold (sparse, under a budget)
    shortlist: int = 0  # output-layer candidates read exactly per position; 0: exact head
    shortlist_bytes: int = 0  # the resident proxy and the candidates' read buffers
    ring_scratch: bool = False  # the candidates' pages are read into a free ring buffer

    @property
    def ffn_cached(self) -> bool:
        """FFNs run from neuron caches that read from the store (sparse, under a budget)."""
        return self.sparse is not None and self.budget is not None

    def describe(self, store: Store) -> str:
        mb = 1e6
        budget = "unlimited" if self.budget is None else f"{self.budget / mb:.1f} MB"
        total = sum(e.nbytes for e in store.tensors.values())
        head = (f"output layer {self.head_resident_rows} of {store.tensors[self.head].rows} "
                "rows" + ("" if not self.shortlist else
                          f"; shortlist: proxy {self.shortlist_bytes / mb:.1f} MB scores every "
                          f"token, the best {self.shortlist} are computed exactly"))
        return (f"memory plan: budget {budget} above baseline; store {total / mb:.1f} MB\n"
                f"  resident weights {self.resident_bytes / mb:7.1f} MB ({head})\n"
                f"  KV cache {self.kv_bytes / mb:.1f} MB, I/O buffers "
                f"{self.buffer_bytes / mb:.1f} MB, scratch {self.scratch_bytes / mb:.1f} MB, "
                f"tokenizer and runtime {self.overhead_bytes / mb:.1f} MB "
                f"(+{self.transient_bytes / mb:.1f} MB while encoding)\n"
                f"  streamed per token {self.streamed_bytes / mb:7.1f} MB"
                + ("" if not self.shortlist else
                   f" + up to {self.shortlist} output-layer rows")
                + ("" if self.sparse is None else
                   f"\n  FFN: {self.sparse.describe()}; selector data "
                   f"{self.selector_bytes / mb:.1f} MB, "
                   + ("all neurons resident" if not self.cache_rows else
                      f"neuron caches of {self.cache_rows} of {store.config.ffn_size} neurons "
                      "per layer, the rest read on demand" + self._cache_warning(store))))

    def _cache_warning(self, store: Store) -> str:
        """A note when a token's neurons (at the target sparsity) outnumber the cache's."""
        needed = round((1 - self.sparse.sparsity) * store.config.ffn_size)
        if self.cache_rows >= needed:
            return ""
        return (f"\n  note: a token needs about {needed} neurons per layer, more than the "
                "caches hold, so most are read every token (dense streaming may read less)")


def _ring_size(budget: int, base: int, weights: int, buffer: int, stream_all: bool) -> int:
    """Streaming ring size: none if every weight fits; else the deepest ring whose extra
    buffers (beyond two) cost at most a tenth of what then streams per token, since each
    byte of buffer is a byte less of resident weights."""
    if not stream_all and base + weights <= budget:
        return 0
    streamed_with_two = weights - max(0, budget - base - 2 * buffer) * (not stream_all)
    for depth in sorted(BUFFERS, reverse=True):
        extra = (depth - 2) * buffer
        if base + depth * buffer <= budget and extra <= streamed_with_two / 10:
            return depth
    return min(BUFFERS)


def kv_bytes(config: ModelConfig, ctx: int) -> int:
    return 2 * 2 * config.n_layers * config.n_kv_heads * config.head_dim * ctx  # fp16 K and V


def selector_bytes(store: Store, sparse: SparseSettings, ffn_resident: bool) -> int:
    """DRAM the selectors take: float32 predictors, or gate rows unless the FFN is resident."""
    config = store.config
    if sparse.selector == "predicted":
        return 4 * store.sparsity.rank * (config.hidden_size + config.ffn_size) * config.n_layers
    if ffn_resident:
        return 0
    return sum(store.tensors[layer_key(i, "ffn")].nbytes // 3 for i in range(config.n_layers))


def shortlist_bytes(store: Store, candidates: int) -> int:
    """DRAM a shortlist head takes: the proxy, candidate rows and the pages they are read
    through."""
    row = store.tensors["embed" if store.config.tie_embeddings else "output"].row_nbytes
    proxy = sum(e.nbytes for e in store.head_proxy.values())
    return proxy + candidates * row + SHORTLIST_SCRATCH


def make_plan(store: Store, budget: int | None, ctx: int, overhead: int,
              transient: int = 0, stream_all: bool = False,
              sparse: SparseSettings | None = None, head: str = "auto",
              candidates: int = SHORTLIST) -> Plan:
    """`overhead`: bytes above baseline in use now; `transient`: bytes needed briefly while
    no generation runs (encoding a prompt loads the vocabulary), sharing the room that the
    KV cache, scratch and margin take during generation. `stream_all` keeps no weight
    resident (the naive baseline of the benchmarks: every weight read every token).
    `head`: the output layer's plan, "exact", "shortlist" or "auto" (shortlist when the
    output layer does not fit and the store has a proxy), computing `candidates` rows exactly."""
    if head not in HEAD_PLANS:
        raise FlashInferError(f"unknown output-layer plan {head!r} (use {', '.join(HEAD_PLANS)})")
    if head == "shortlist" and store.head_proxy is None:
        raise FlashInferError(f"store {store.path} has no output-layer proxy (convert the "
                              "model again with this version)")
    args = (store, budget, ctx, overhead, transient, stream_all, sparse)
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
    if exact.head_resident_rows < store.tensors[exact.head].rows:
        try:
            return _make_plan(*args, candidates)
        except BudgetError:  # the proxy itself does not fit: stream the output layer
            pass
    return exact


def _make_plan(store: Store, budget: int | None, ctx: int, overhead: int, transient: int,
               stream_all: bool, sparse: SparseSettings | None, shortlist: int) -> Plan:
    config = store.config
    head = "embed" if config.tie_embeddings else "output"
    tensors = store.tensors
    vectors = {n for n, e in tensors.items() if e.codec == "f32"}
    attention = [[layer_key(i, f) for f in ("wq", "wk", "wv", "wo")]
                 for i in range(config.n_layers)]
    ffn = [[layer_key(i, "ffn")] for i in range(config.n_layers)]
    plan = Plan(budget, head, kv_bytes=kv_bytes(config, ctx),
                scratch_bytes=config.vocab_size * 4 * 6 + (4 << 20), overhead_bytes=overhead,
                transient_bytes=transient, sparse=sparse, shortlist=shortlist)
    if shortlist:
        plan.shortlist_bytes = shortlist_bytes(store, shortlist)
    plan.resident |= vectors
    bundle = tensors[layer_key(0, "ffn")].row_nbytes
    units = attention + ffn if sparse is None or budget is None else attention
    if sparse is not None and budget is None:
        plan.selector_bytes = selector_bytes(store, sparse, ffn_resident=True)
    elif sparse is not None:
        plan.selector_bytes = selector_bytes(store, sparse, ffn_resident=False)
        plan.scratch_bytes += NEURON_SCRATCH + NEURON_SPILL
    if budget is None:
        for names in units:
            plan.resident |= set(names)
        plan.head_resident_rows = tensors[head].rows
    else:
        largest = max(max(sum(tensors[n].nbytes for n in u) for u in units),
                      0 if shortlist else min(OUTPUT_CHUNK, tensors[head].nbytes))
        min_caches = 0 if sparse is None else MIN_CACHE_ROWS * bundle * config.n_layers
        # Generation needs the KV cache, scratch and I/O buffers; encoding a prompt needs the
        # vocabulary instead, while the I/O buffers' pages and the shortlist's scores and read
        # pages are released (StreamedWeights.release_io_buffers), so the two share that room.
        generation = plan.kv_bytes + plan.scratch_bytes + MARGIN
        encoding = transient + MARGIN // 2
        base = overhead + sum(tensors[n].nbytes for n in vectors) + plan.shortlist_bytes \
            + generation
        weights = sum(e.nbytes for n, e in tensors.items() if n not in vectors
                      and n != ("output" if head == "embed" else "embed")
                      and not (shortlist and n == head))
        if sparse is not None:  # FFNs go to the neuron caches, never through the ring
            weights -= sum(tensors[n].nbytes for (n,) in ffn)
            base += min_caches + plan.selector_bytes
        plan.buffer_unit = align_up(largest + 4096)
        # with sparsity, no ring only if the caches can also hold every neuron
        all_weights = weights if sparse is None else \
            weights + sum(tensors[n].nbytes for (n,) in ffn) - min_caches
        plan.buffers = _ring_size(budget, base, all_weights, plan.buffer_unit, stream_all)
        plan.buffer_bytes = plan.buffers * plan.buffer_unit
        if shortlist and sparse is None and plan.buffers and plan.buffer_unit >= RING_SCRATCH:
            plan.ring_scratch = True  # no read buffer of its own (shortlist_head.py)
            plan.shortlist_bytes -= SHORTLIST_SCRATCH
            base -= SHORTLIST_SCRATCH
        released = 0 if not shortlist else store.head_proxy[SCORES].nbytes \
            + SHORTLIST_SCRATCH * (not plan.ring_scratch)

        def peak(ring: int) -> int:
            return base + ring + max(0, encoding - generation - ring - released)

        fixed = peak(plan.buffer_bytes)
        plan.fixed_bytes = peak(min(BUFFERS) * plan.buffer_unit)
        if fixed > budget:
            raise BudgetError(
                f"memory budget {budget / 1e6:.1f} MB is too small: the smallest that works "
                f"with a {ctx}-token context is {plan.fixed_bytes / 1e6:.1f} MB above baseline "
                f"(KV cache {plan.kv_bytes / 1e6:.1f} MB: a smaller -c lowers it)",
                plan.fixed_bytes)
        room = 0 if stream_all else budget - fixed
        for names in units:
            size = sum(tensors[n].nbytes for n in names)
            if size <= room:
                plan.resident |= set(names)
                room -= size
        if sparse is not None:
            room += min_caches
            plan.cache_rows = min(config.ffn_size, room // (bundle * config.n_layers))
            room -= plan.cache_rows * bundle * config.n_layers
        plan.head_resident_rows = min(tensors[head].rows, room // tensors[head].row_nbytes)
    plan.resident_bytes = (sum(tensors[n].nbytes for n in plan.resident)
                           + plan.head_resident_rows * tensors[head].row_nbytes
                           + plan.shortlist_bytes)
    if plan.cache_rows:
        plan.resident_bytes += plan.cache_rows * bundle * config.n_layers
    streamed = [n for n in tensors if n not in plan.resident and n not in ("embed", "output")
                and not (plan.cache_rows and n.endswith(".ffn"))]
    plan.streamed_bytes = sum(tensors[n].nbytes for n in streamed)
    if not shortlist:
        plan.streamed_bytes += (tensors[head].rows - plan.head_resident_rows) \
            * tensors[head].row_nbytes
    return plan
