"""Generation in three layers: token steps -> streamed responses (text + stats) -> text.

`generate_step` yields token ids (prefill in batches, then one decode step per token);
`stream_generate` turns them into `GenerationResponse`s with detokenized text, stop handling
and speed/memory statistics; `Model.generate` in api.py joins the text.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import FlashInferError
from .kv_cache import KVCache
from .loader.tokenizer import Tokenizer
from .memory import peak_rss_bytes, release_freed_memory
from .model import Transformer
from .sampling import LogitsProcessor, Sampler
from .stats import IOStats


@dataclass
class GenerationResponse:
    text: str  # text added by this step (may be empty while a UTF-8 char or stop is pending)
    token: int  # the token sampled at this step
    prompt_tokens: int
    prompt_tps: float  # prompt tokens per second of prefill
    generation_tokens: int  # tokens generated so far
    generation_tps: float  # decode tokens per second so far
    peak_memory: int  # peak resident memory of the process, bytes
    finish_reason: str | None  # None while generating; "stop" (EOS/stop string) or "length"
    bytes_read: int = 0  # from the flash store since generation began (0 for in-memory models)
    reads: int = 0  # read requests issued since generation began
    io_wait: float = 0.0  # seconds spent waiting for reads since generation began
    neurons_needed: int = 0  # FFN neurons the sparsity selectors chose, since generation began
    neuron_hits: int = 0  # of those, found in a neuron cache
    neurons_read: int = 0  # read from the store into a neuron cache
    cache_time: float = 0.0  # seconds spent managing neuron caches
    kv_bytes_read: int = 0  # spilled KV read back from flash by the decode steps so far
    kv_wait: float = 0.0  # seconds the decode steps waited for those reads


def prefill(engine: Transformer, tokens: Sequence[int], cache: KVCache,
            all_logits: bool = False, rows: np.ndarray | None = None) -> np.ndarray:
    """Run `tokens` through the model in batches of engine.prefill_batch (the memory plan's);
    the logits of the last position, of every position (`all_logits`), or of the positions
    in `rows` (sorted, distinct), filled batch by batch into one array."""
    if all_logits:
        rows = np.arange(len(tokens))
    outputs: np.ndarray | None = None
    batch = engine.prefill_batch
    for start in range(0, len(tokens), batch):
        chunk = np.asarray(tokens[start:start + batch], dtype=np.int64)
        last = start + batch >= len(tokens)
        if rows is not None:
            first, end = np.searchsorted(rows, [start, start + len(chunk)])
            if end > first:
                logits = engine.forward(chunk, cache, all_logits=True)
                if outputs is None:
                    outputs = np.empty((len(rows), logits.shape[1]), np.float32)
                outputs[first:end] = logits[rows[first:end] - start]
                del logits
            else:
                engine.forward(chunk, cache, logits=False)
        elif last:
            outputs = engine.forward(chunk, cache)
        else:  # no output layer for a batch whose logits nobody reads
            engine.forward(chunk, cache, logits=False)
        if len(tokens) > batch:
            # a batch's temporaries (attention scores, onnxruntime's buffers) come in other
            # sizes as the context grows: without this, glibc keeps each batch's pieces and
            # RSS climbs by hundreds of MB over a long prompt
            release_freed_memory()
    return outputs


def generate_step(engine: Transformer, prompt: Sequence[int], cache: KVCache, sampler: Sampler,
                  processors: Sequence[LogitsProcessor] = ()) -> Iterator[int]:
    """Yield sampled tokens forever; the caller decides when to stop."""
    history = list(prompt)
    logits = prefill(engine, prompt, cache)[-1]
    while True:
        if not np.isfinite(logits).all():
            raise FlashInferError("the model produced NaN or infinite logits: its weights "
                                  "may be damaged (check the store with --verify, or convert "
                                  "it again)")
        for process in processors:
            logits = process(history, logits)
        token = sampler(logits)
        yield token
        history.append(token)
        logits = engine.forward(np.array([token]), cache)[-1]


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the tail of `text` that could be the start of a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def stream_generate(engine: Transformer, tokenizer: Tokenizer, prompt: Sequence[int],
                    cache: KVCache, sampler: Sampler, processors: Sequence[LogitsProcessor],
                    max_tokens: int, stop: Sequence[str] = (),
                    io_stats: IOStats | None = None) -> Iterator[GenerationResponse]:
    """Responses for each sampled token. Text is detokenized as it streams (O(1) work per
    token) and held back while it could be the start of a stop string."""
    stops = [s for s in stop if s]
    keep = max((len(s) for s in stops), default=1) - 1  # handed-out text a stop may span
    io_start = io_stats.snapshot() if io_stats is not None else IOStats()
    steps = generate_step(engine, prompt, cache, sampler, processors)
    detokenizer = tokenizer.detokenizer()
    start = time.perf_counter()
    generated = 0
    pending = ""  # final text not handed out yet (it may be the start of a stop string)
    tail = ""  # the last `keep` characters handed out
    prompt_tps = 0.0
    decode_start = start
    for token in steps:
        now = time.perf_counter()
        if not generated:
            prompt_tps = len(prompt) / max(now - start, 1e-9)
            decode_start = now
            kv_start = cache.spill_stats.snapshot()
        finish = None
        if token in tokenizer.eog_ids:
            finish = "stop"
        else:
            generated += 1
            pending += detokenizer.add(token)
        window = tail + pending  # a stop string never starts inside `tail` (held back)
        hit = min((i for i in (window.find(s) for s in stops) if i >= 0), default=-1)
        if hit >= 0:
            pending, finish = window[len(tail):hit], "stop"
        elif finish is None and (generated >= max_tokens
                                 or cache.length + 1 >= cache.max_tokens):
            finish = "length"
        if finish and hit < 0:
            pending += detokenizer.finish()  # incomplete UTF-8 at the end becomes U+FFFD
        held = 0 if finish else min(len(pending), _held_back(window, stops))
        new_text, pending = pending[:len(pending) - held], pending[len(pending) - held:]
        tail = (tail + new_text)[-keep:] if keep else ""
        n_decoded = max(generated - 1, 0)  # the first token came from the prefill
        elapsed = time.perf_counter() - decode_start
        io = io_stats.since(io_start) if io_stats is not None else IOStats()
        kv = cache.spill_stats.since(kv_start)
        yield GenerationResponse(
            text=new_text, token=token, prompt_tokens=len(prompt), prompt_tps=prompt_tps,
            generation_tokens=generated,
            generation_tps=n_decoded / elapsed if n_decoded and elapsed > 0 else 0.0,
            peak_memory=peak_rss_bytes(), finish_reason=finish, bytes_read=io.bytes_read,
            reads=io.reads, io_wait=io.wait_seconds, neurons_needed=io.neurons_needed,
            neuron_hits=io.neuron_hits, neurons_read=io.neurons_read,
            cache_time=io.cache_seconds, kv_bytes_read=kv.bytes_read, kv_wait=kv.wait_seconds)
        if finish:
            steps.close()
            return
