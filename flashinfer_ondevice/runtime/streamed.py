"""Weights of a flash store under a plan: resident parts in DRAM, the rest streamed.

Every forward pass walks the same cycle of streamed *units* (runtime/units.py: a layer's
non-resident tensors, then the output layer's non-resident rows in chunks). A ring of aligned
buffers (as many and as large as the plan says) is used in turn: while unit k is computed
from one, the following units are being read into the others (Fuyou/FlexGen-style
prefetch), and the next pass's first units are read while the last ones compute.
Under a shortlist plan the output layer is a ShortlistHead instead (no streamed units).
Implements the `ModelWeights` interface of weights.py; `allocated()` reports the run memory
it holds per component, in the terms of `Plan.ledger`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import numpy as np

from ..backends import make_backend
from ..backends.base import Backend
from ..config import ModelConfig
from ..errors import FlashInferError
from ..functional import ACTIVATIONS
from ..memory import aligned_buffer, release_freed_memory, release_pages
from ..quant.codecs import codec
from ..schema import LAYER_MATRICES, LAYER_VECTORS, layer_key
from ..store.format import ALIGN, align_up
from ..store.io import DirectReader, PendingRead
from ..store.reader import Store, TensorEntry, corrupt
from ..store.sparsity_record import load_predictors
from ..weights import Block, FeedForward
from . import neuron_cache
from .head_rows import HeadRows
from .neuron_cache import NeuronCache
from .planner import Plan, largest_matrix
from .selectors import GateFirstSelector, PredictedSelector
from .shortlist_head import ShortlistHead
from .sparse_ffn import SparseFFN
from .stored import (
    BundledFFN,
    PreparedMatrix,
    StackedMatrix,
    StoredMatrix,
    resident_ffn,
    resident_matrix,
)
from .units import Unit, head_chunk_rows

EMBED_SCRATCH = 256 << 10  # pages a prompt's embedding rows are read through (prepared head)


class StreamedWeights:
    """`ffns[i]`, when set, replaces layer i's FFN (sparse FFNs, calibration recorders).
    `backend` computes from the bytes; the tensors of the plan's device tier are handed to
    it once to keep in its own form (backends/base.py), as the plan counted them; with
    `prepare`, every resident matrix and dense FFN is, which the planner does not count:
    only without a budget. Where every product of a token then runs in the backend's forms
    (`_all_prepared`), the backend is told so (`alone`) and each layer's wq, wk and wv are
    prepared as one matrix."""

    lm_head: _StreamedHead | ShortlistHead

    def __init__(self, store: Store, plan: Plan, reader: DirectReader,
                 backend: Backend | None = None, prepare: bool = False):
        self.store, self.plan, self.reader = store, plan, reader
        self.backend = backend = backend or make_backend()
        self.config: ModelConfig = store.config
        self.activation = self.config.traits.activation
        t = store.tensors
        self._resident: dict[str, StoredMatrix | PreparedMatrix | BundledFFN] = {}
        self._vectors = {n: self._read_all(e).view(np.float32).reshape(-1)
                         for n, e in t.items() if e.codec == "f32"}
        damaged = [n for n, v in self._vectors.items() if not np.isfinite(v).all()]
        if damaged:  # norms and biases: NaN here would only show as garbage text
            raise corrupt(store.path, f"{damaged[0]} holds NaN or infinite values (run with "
                                      "--verify to check the checksums)")
        self._staging_nbytes = backend.reserve_staging(largest_matrix(store))
        self.head_rows = HeadRows.of(store, plan.head)  # the output layer's rows, by tier
        alone = prepare and self._all_prepared()
        stacked = self._stack_qkv() if alone else set()
        for name in plan.resident:
            entry = t[name]
            if entry.codec == "f32" or name in stacked:
                continue
            if name in plan.device:
                self._resident[name] = self._device_form(entry)
            elif prepare and name.endswith(".ffn") and plan.sparse is None:
                down = self._down_rows(entry)
                self._resident[name] = resident_ffn(self._read_all(entry), entry.codec,
                                                    entry.cols, self.activation, backend,
                                                    alone, down)
                del down
            elif prepare and not name.endswith(".ffn"):
                self._resident[name] = resident_matrix(
                    lambda start, end, e=entry: self._read_rows(e, start, end), entry.rows,
                    entry.codec, entry.cols, backend, alone)
            else:
                self._resident[name] = self._wrap(entry, self._read_all(entry))
        head_rows = self.head_rows
        self._embed_rows = HeadRows.of(store, "embed")  # the input embedding's rows
        tiers = self._embed_rows.vocab_tiers  # its token -> stored row map, as planned
        self._row_of = None if tiers is None else tiers.row_of
        head = head_rows.tiers[0]  # the device form's rows are the first tier's
        prepared_head = prepare and not plan.shortlist
        # the output layer's resident rows: the first plan.head_device_rows in the device
        # form, the next ones as codec bytes in DRAM (`_head_dram`, rows from
        # `_head_dram_start`), unless a budget-free run prepared them all
        self._head_dram_start = 0 if prepared_head else plan.head_device_rows
        self._head_dram: StoredMatrix | StackedMatrix | None = None if prepared_head else \
            self._head_matrix(self._head_dram_start, plan.head_resident_rows)
        self._head_device_nbytes = 0
        if prepared_head:
            parts = [resident_matrix(lambda start, end, e=e, lo=lo: self._read_rows(
                e, lo + start, lo + end), hi - lo, e.codec, e.cols, backend, alone)
                for e, lo, hi in head_rows.parts(0, plan.head_resident_rows)]
            self._head_resident: StoredMatrix | PreparedMatrix | StackedMatrix = \
                parts[0] if len(parts) == 1 else PreparedMatrix(parts, plan.head_resident_rows)
        elif plan.head_device_rows:
            on_device = self._device_rows(head, plan.head_device_rows)
            self._head_device_nbytes = on_device.nbytes
            self._head_resident = PreparedMatrix(
                on_device.parts + ([self._head_dram] if self._head_dram.rows else []),
                plan.head_resident_rows)
        else:
            self._head_resident = self._head_dram
        self._units: list[Unit] = []
        self._layer_unit: dict[int, int] = {}
        for i in range(self.config.n_layers):
            fields = LAYER_MATRICES + (() if plan.ffn_cached else ("ffn",))
            names = [layer_key(i, f) for f in fields]
            streamed = [n for n in names if n not in plan.resident]
            if streamed:
                unit = Unit()
                for n in streamed:
                    unit.add(t[n], 0, t[n].rows)
                self._layer_unit[i] = len(self._units)
                self._units.append(unit)
        self._head_units: list[int] = []
        streamed = [] if plan.shortlist else head_rows.parts(plan.head_resident_rows,
                                                             head_rows.rows)
        for entry, first, end in streamed:  # chunks of one tier each
            rows = head_chunk_rows(entry, plan.head_chunk)
            for start in range(first, end, rows):
                unit = Unit()
                unit.add(entry, start, min(start + rows, end))
                self._head_units.append(len(self._units))
                self._units.append(unit)
        largest = max((u.nbytes for u in self._units), default=0)
        if largest > plan.buffer_unit or (self._units and not plan.buffers):
            raise AssertionError(f"the plan's ring ({plan.buffers} x {plan.buffer_unit} bytes) "
                                 f"cannot stream units of up to {largest} bytes")
        self._buffers = [aligned_buffer(plan.buffer_unit)
                         for _ in range(plan.buffers)] if self._units else []
        self._queue: deque[tuple[int, int, PendingRead]] = deque()  # (unit, buffer, read)
        self._next_buffer = 0
        self._handed_out: int | None = None  # ring buffer of the unit acquired last
        self.final_norm = self._vectors["final_norm"]
        self.rope_freq_factors = self._vectors.get("rope_freqs")
        self.lm_head = _StreamedHead(self) if not plan.shortlist else self._shortlist_head()
        # the output layer's resident rows, in stored order (runtime/head_rows.py)
        self.lm_head_rows = self._head_resident
        # a prepared output layer keeps no embedding rows: a prompt's are read in one go
        self._embed_scratch = aligned_buffer(EMBED_SCRATCH) \
            if isinstance(self._head_resident, PreparedMatrix) and prepared_head else None
        if prepare or plan.device or plan.head_device_rows:  # codec bytes handed over, freed
            release_freed_memory()
        self.ffns: dict[int, FeedForward] = {}
        self._caches: list[NeuronCache] = []
        self._shared_cache_nbytes = 0
        self._selector_arrays: list[np.ndarray] = []
        if plan.sparse is not None:
            self._make_sparse_ffns()

    def _down_rows(self, ffn: TensorEntry) -> np.ndarray | None:
        """An FFN's down projection by row (store/down_rows.py), where the store keeps it
        and the backend prepares the FFN."""
        entry = (self.store.down_rows or {}).get(ffn.name)
        ffn_codec = codec(ffn.codec)
        if entry is None or not self.backend.takes_down_rows(ffn_codec) or \
                not self.backend.prepares_ffn(ffn_codec, ffn.cols, ffn.rows):
            return None
        reader = DirectReader(entry.path, threads=4, stats=self.reader.stats)
        try:
            return reader.read(entry.offset, entry.nbytes).reshape(entry.rows, -1)
        finally:
            reader.close()

    def _all_prepared(self) -> bool:
        """Whether, prepared, every product of a token runs in the backend's own forms: all
        weights resident, dense FFNs, an exact output layer, codecs the backend prepares."""
        plan, t, backend = self.plan, self.store.tensors, self.backend
        head_rows = self.head_rows
        if plan.sparse is not None or plan.shortlist or plan.device or \
                plan.head_resident_rows < head_rows.rows or \
                not all(backend.prepares(codec(e.codec), e.cols) for e in head_rows.tiers):
            return False
        for i in range(self.config.n_layers):
            for field in (*LAYER_MATRICES, "ffn"):
                entry = t[layer_key(i, field)]
                c = codec(entry.codec)
                if entry.name not in plan.resident or not (
                        backend.prepares_ffn(c, entry.cols, entry.rows) if field == "ffn"
                        else backend.prepares(c, entry.cols)):
                    return False
        return True

    def _stack_qkv(self) -> set[str]:
        """Prepare each layer's wq, wk and wv as one matrix (`Block.wqkv`: one product
        instead of three) where they share a codec; the names of the matrices it took."""
        taken = set()
        for i in range(self.config.n_layers):
            names = [layer_key(i, f) for f in ("wq", "wk", "wv")]
            entries = [self.store.tensors[n] for n in names]
            if len({e.codec for e in entries}) > 1:
                continue
            stacked = np.concatenate([self._read_all(e) for e in entries])
            self._resident[layer_key(i, "wqkv")] = resident_matrix(
                lambda start, end, rows=stacked: rows[start:end], len(stacked),
                entries[0].codec, entries[0].cols, self.backend, alone=True)
            taken.update(names)
        return taken

    def _device_form(self, entry: TensorEntry) -> PreparedMatrix:
        """A tensor of the device tier in the backend's form (the planner asked the backend
        that it keeps one)."""
        if not entry.name.endswith(".ffn"):
            return self._device_rows(entry, entry.rows)
        prepared = resident_ffn(self._read_all(entry), entry.codec, entry.cols,
                                self.activation, self.backend)
        if not isinstance(prepared, PreparedMatrix):
            raise AssertionError(f"the {self.backend.name} backend kept no device form of "
                                 f"{entry.name}, which the plan placed there")
        return prepared

    def _device_rows(self, entry: TensorEntry, rows: int) -> PreparedMatrix:
        """The first `rows` rows of a matrix in the device form (all of a layer's matrix, or
        the output layer's share of the device tier)."""
        prepared = resident_matrix(lambda start, end: self._read_rows(entry, start, end), rows,
                                   entry.codec, entry.cols, self.backend)
        if not isinstance(prepared, PreparedMatrix):
            raise AssertionError(f"the {self.backend.name} backend kept no device form of "
                                 f"{entry.name}, which the plan placed there")
        return prepared

    def _shortlist_head(self) -> ShortlistHead:
        return ShortlistHead(self.store.head_proxy, self._head_resident,
                             self.store.tensors[self.plan.head], self.reader,
                             self.plan.shortlist,
                             self._free_buffer if self.plan.ring_scratch and self._units
                             else None)

    def _free_buffer(self) -> np.ndarray:
        """The ring buffer whose unit was computed last: free until the next pass's first
        acquire (the output layer runs in between, so it reads its candidates there)."""
        return self._buffers[self._handed_out]

    def _make_sparse_ffns(self) -> None:
        sparse, config, record = self.plan.sparse, self.config, self.store.sparsity
        activation_fn = ACTIVATIONS[self.activation]
        k = record.target_index(sparse.sparsity)
        if sparse.selector == "predicted":
            try:
                load_predictors(record, config, self.store.path)
            except ValueError as exc:
                raise corrupt(self.store.path, str(exc)) from None
            self._selector_arrays = [a for layer in record.layers for a in (layer.a, layer.b)]
        first = self.store.tensors[layer_key(0, "ffn")]
        scratch = spill = None
        if self.plan.ffn_cached:
            scratch = aligned_buffer(neuron_cache.SCRATCH)
            spill = np.zeros((neuron_cache.spill_rows(first), first.row_nbytes), np.uint8)
            self._shared_cache_nbytes = len(scratch) + spill.nbytes
        for i in range(config.n_layers):
            entry = self.store.tensors[layer_key(i, "ffn")]
            layer = record.layers[i]
            bundles = self._resident.get(entry.name)
            if sparse.selector == "predicted":
                selector = PredictedSelector(layer.a, layer.b, layer.predictor_thresholds[k],
                                             activation_fn)
            else:
                gates = bundles
                if gates is None:  # gate rows only, read once from the bundles
                    gates = BundledFFN(self._gate_rows(entry, scratch), entry.codec, entry.cols,
                                       self.activation, self.backend)
                    self._selector_arrays.append(gates.raw)
                selector = GateFirstSelector(gates, layer.thresholds[k])
            cache = None
            if bundles is None:
                cache = NeuronCache(entry, self.reader, self.plan.cache_rows, sparse.window,
                                    scratch, spill, self.activation, self.backend)
                self._caches.append(cache)
            self.ffns[i] = SparseFFN(selector, config.hidden_size, self.reader.stats,
                                     bundles, cache)

    def _gate_rows(self, entry: TensorEntry, scratch: np.ndarray) -> np.ndarray:
        """The gate third of every bundle, read through `scratch` a block of rows at a time."""
        gate_nbytes = entry.row_nbytes // 3
        gates = np.empty((entry.rows, gate_nbytes), np.uint8)
        per_read = max(1, (len(scratch) - ALIGN) // entry.row_nbytes)
        for start in range(0, entry.rows, per_read):
            end = min(start + per_read, entry.rows)
            first = entry.offset + start * entry.row_nbytes
            aligned = first - first % ALIGN
            nbytes = align_up(first + (end - start) * entry.row_nbytes) - aligned
            self.reader.submit([(aligned, nbytes, 0)], scratch).wait()
            rows = scratch[first - aligned:first - aligned + (end - start) * entry.row_nbytes]
            gates[start:end] = rows.reshape(end - start, -1)[:, :gate_nbytes]
        return gates

    def release_io_buffers(self) -> None:
        """Drop the pages of the I/O buffers (prefetched units; the shortlist's scores and
        read pages) while no forward pass runs, so encoding a prompt can use their room
        (planner.py); the next pass reads them again."""
        while self._queue:
            self._queue.popleft()[2].wait()
        for buffer in self._buffers:
            release_pages(buffer)
        if isinstance(self.lm_head, ShortlistHead):
            self.lm_head.release()

    def close(self) -> None:
        """Wait for reads in flight, then close the reader (and the shortlist's)."""
        while self._queue:
            self._queue.popleft()[2].wait()
        if isinstance(self.lm_head, ShortlistHead):
            self.lm_head.close()
        self.reader.close()
        self._resident.clear()  # prepared forms hold their own memory and threads
        self._head_resident = self._head_dram = None

    def resident_ffn(self, layer: int) -> BundledFFN | None:
        """Layer `layer`'s FFN bundles if resident as bytes (never prepared: builders open
        stores without preparing)."""
        ffn = self._resident.get(layer_key(layer, "ffn"))
        if ffn is not None and not isinstance(ffn, BundledFFN):
            raise TypeError("the FFN was prepared in a backend's form: open the store with "
                            "quality='exact' (or a budget) to read its bundles")
        return ffn

    def allocated(self) -> dict[str, int]:
        """Bytes of run memory this holds per component, in the terms of `Plan.ledger`."""
        weights = sum(a.nbytes for a in self._vectors.values()) + self._head_resident.nbytes \
            - self._head_device_nbytes \
            + self._embed_rows.index_nbytes
        weights += sum(w.nbytes for n, w in self._resident.items() if n not in self.plan.device)
        device = self._head_device_nbytes + sum(
            w.nbytes for n, w in self._resident.items() if n in self.plan.device)
        shortlist = self.lm_head.nbytes() if isinstance(self.lm_head, ShortlistHead) else 0
        return {"resident weights": weights, "device weights": device,
                "backend staging": self._staging_nbytes,
                "I/O ring": sum(len(b) for b in self._buffers)
                + (0 if self._embed_scratch is None else len(self._embed_scratch)),
                "shortlist head": shortlist,
                "selectors": sum(a.nbytes for a in self._selector_arrays),
                "neuron caches": self._shared_cache_nbytes
                + sum(c.nbytes() for c in self._caches)}

    # reading ---------------------------------------------------------------------------
    def _head_matrix(self, start: int, end: int) -> StoredMatrix | StackedMatrix:
        """The output layer's stored rows [start, end) as codec bytes (split by tier)."""
        parts = [StoredMatrix(self._read_rows(e, lo, hi), e.codec, e.cols, self.backend)
                 for e, lo, hi in self.head_rows.parts(start, end)]
        if not parts:  # no rows
            first = self.head_rows.tiers[0]
            return StoredMatrix(self._read_rows(first, 0, 0), first.codec, first.cols,
                                self.backend)
        return parts[0] if len(parts) == 1 else StackedMatrix(parts, end - start)

    def _read_rows(self, entry: TensorEntry, start: int, end: int) -> np.ndarray:
        if end <= start:
            return np.empty((0, entry.row_nbytes), np.uint8)
        raw = self.reader.read(entry.offset + start * entry.row_nbytes,
                               (end - start) * entry.row_nbytes)
        return raw.reshape(end - start, entry.row_nbytes)

    def _read_all(self, entry: TensorEntry) -> np.ndarray:
        return self._read_rows(entry, 0, entry.rows)

    def _wrap(self, entry: TensorEntry, raw: np.ndarray) -> StoredMatrix | BundledFFN:
        if entry.name.endswith(".ffn"):
            return BundledFFN(raw, entry.codec, entry.cols, self.activation, self.backend)
        return StoredMatrix(raw, entry.codec, entry.cols, self.backend)

    def _submit(self, unit_index: int) -> None:
        """Start reading a unit into the next buffer of the ring."""
        buffer_index = self._next_buffer
        self._next_buffer = (buffer_index + 1) % len(self._buffers)
        unit = self._units[unit_index]
        ranges = [(p.file_start, p.read_nbytes, p.buffer_offset) for p in unit.parts]
        pending = self.reader.submit(ranges, self._buffers[buffer_index])
        self._queue.append((unit_index, buffer_index, pending))

    def acquire(self, unit_index: int) -> dict[str, StoredMatrix | BundledFFN]:
        """Wait for unit `unit_index`, keep the following units reading, return its tensors.

        Units are used in a fixed cycle, so the buffer handed out last time (its unit done
        by now) is the one the ring fills next."""
        while self._queue and self._queue[0][0] != unit_index:  # out of order: drain
            self._queue.popleft()[2].wait()
        if not self._queue:
            self._submit(unit_index)
        _, buffer_index, pending = self._queue.popleft()
        pending.wait()
        following = self._queue[-1][0] if self._queue else unit_index
        while len(self._queue) < min(len(self._buffers) - 1, len(self._units)):
            following = (following + 1) % len(self._units)
            self._submit(following)
        self._handed_out = buffer_index
        buffer = self._buffers[buffer_index]
        tensors = {}
        for p in self._units[unit_index].parts:
            rows = p.row_end - p.row_start
            start = p.buffer_offset + p.skip
            raw = buffer[start:start + rows * p.entry.row_nbytes].reshape(rows, -1)
            tensors[p.entry.name] = self._wrap(p.entry, raw)
        return tensors

    # what the forward pass reads -----------------------------------------------------
    def blocks(self) -> Iterator[Block]:
        for i in range(self.config.n_layers):
            streamed = self.acquire(self._layer_unit[i]) if i in self._layer_unit else {}

            def get(field: str, streamed=streamed, i=i):
                key = layer_key(i, field)
                return self._resident.get(key) or streamed[key]

            vectors = {f: self._vectors.get(layer_key(i, f)) for f in LAYER_VECTORS}
            ffn = self.ffns[i] if i in self.ffns else get("ffn")
            wqkv = self._resident.get(layer_key(i, "wqkv"))
            if wqkv is not None:
                yield Block(None, None, None, get("wo"), ffn, wqkv=wqkv, **vectors)
            else:
                yield Block(get("wq"), get("wk"), get("wv"), get("wo"), ffn, **vectors)

    def embedding(self, tokens: np.ndarray) -> np.ndarray:
        """Input embedding rows, read on demand (from DRAM if that row is resident as codec
        bytes; rows in a backend's form are read from the store)."""
        embed = self._embed_rows
        tokens = np.asarray(tokens)
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= embed.rows):
            raise FlashInferError(f"token ids must be within 0..{embed.rows - 1}")
        rows = tokens if self._row_of is None else self._row_of[tokens]
        if self._embed_scratch is not None:
            unique, where = np.unique(rows, return_inverse=True)
            out = np.empty((len(unique), self.config.hidden_size), np.float32)
            base = 0
            for entry in embed.tiers:
                mine = (unique >= base) & (unique < base + entry.rows)
                if mine.any():
                    raw = np.empty((int(mine.sum()), entry.row_nbytes), np.uint8)
                    self.reader.read_rows(entry.offset, entry.row_nbytes, unique[mine] - base,
                                          self._embed_scratch, raw)
                    out[mine] = StoredMatrix(raw, entry.codec, entry.cols,
                                             self.backend).decode_rows(0, len(raw))
                base += entry.rows
            return out[where.reshape(-1)]
        in_dram, start = self._head_dram if self.plan.head == "embed" else None, \
            self._head_dram_start
        decoded = []
        for row in rows.tolist():
            if in_dram is not None and start <= row < start + in_dram.rows:
                decoded.append(in_dram.decode_rows(row - start, row - start + 1))
            else:
                ((entry, lo, hi),) = embed.parts(row, row + 1)
                decoded.append(StoredMatrix(self._read_rows(entry, lo, hi), entry.codec,
                                            entry.cols, self.backend).decode_rows(0, 1))
        return np.concatenate(decoded)


class _StreamedHead:
    """The output layer (a `Matrix`): resident rows, then streamed chunks of rows."""

    def __init__(self, weights: StreamedWeights):
        self.weights = weights
        self.rows = weights.head_rows.rows
        self.order = weights.head_rows.order  # stored rows -> tokens (None: the same)

    def apply(self, x: np.ndarray) -> np.ndarray:
        w = self.weights
        if not w._head_units and self.order is None:  # all resident: no copy of the logits
            return w._head_resident.apply(x)
        out = np.empty((len(x), self.rows), np.float32)
        done = w._head_resident.rows
        if done:
            self._put(out, 0, w._head_resident.apply(x))
        for unit_index in w._head_units:
            (matrix,) = w.acquire(unit_index).values()
            self._put(out, done, matrix.apply(x))
            done += matrix.rows
        return out

    def _put(self, out: np.ndarray, start: int, logits: np.ndarray) -> None:
        """The logits of stored rows [start, start + n), put in token order."""
        end = start + logits.shape[1]
        if self.order is None:
            out[:, start:end] = logits
        else:
            out[:, self.order[start:end]] = logits
