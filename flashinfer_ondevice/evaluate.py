"""Quality on text: perplexity, and agreement with the dense model (top-1, KL divergence).

Text is scored in chunks of `ctx` tokens, each a fresh context starting with BOS, one token
at a time as in generation, so a sparse FFN sees exactly what it sees while generating.
With a reference model (the dense one), both run in lockstep and each position compares
next-token distributions: top-1 agreement and KL(dense || this).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from .errors import FlashInferError
from .functional import log_softmax


@dataclass
class EvalReport:
    tokens: int  # positions scored
    perplexity: float
    top1_agreement: float | None  # with the reference model
    mean_kl: float | None  # KL(reference || model), nats per token
    reference_perplexity: float | None
    seconds: float
    bytes_read_per_token: float
    neurons_needed_per_token: float
    neuron_hits_per_token: float
    neurons_read_per_token: float
    io_wait_ms_per_token: float
    cache_ms_per_token: float

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        lines = [f"tokens scored   {self.tokens}", f"perplexity      {self.perplexity:.4f}"]
        if self.top1_agreement is not None:
            lines += [f"dense ppl       {self.reference_perplexity:.4f} "
                      f"({(self.perplexity / self.reference_perplexity - 1) * 100:+.2f}%)",
                      f"top-1 agreement {self.top1_agreement * 100:.2f}%",
                      f"mean KL         {self.mean_kl:.5f} nats"]
        if self.neurons_needed_per_token:
            lines.append(f"FFN neurons     {self.neurons_needed_per_token:.0f} needed, "
                         f"{self.neuron_hits_per_token:.0f} cached, "
                         f"{self.neurons_read_per_token:.0f} read per token")
        lines.append(f"storage reads   {self.bytes_read_per_token / 1e6:.2f} MB per token, "
                     f"I/O wait {self.io_wait_ms_per_token:.2f} ms, cache management "
                     f"{self.cache_ms_per_token:.2f} ms per token")
        return "\n".join(lines)


def evaluate(model, text: str, ctx: int = 512, max_tokens: int | None = None,
             reference=None, progress: bool = False) -> EvalReport:
    """Score `text` with `model` (and compare with `reference`, if given)."""
    ids = model.tokenize(text, add_special=False)
    if max_tokens is not None:
        ids = ids[:max_tokens + 1]
    if len(ids) < 2:
        raise FlashInferError("the evaluation text has fewer than 2 tokens")
    bos = [model.tokenizer.bos_id] if model.tokenizer.bos_id is not None else []
    if not len(bos) + 2 <= ctx <= model.ctx_size:
        raise FlashInferError(f"evaluation context must be within {len(bos) + 2}.."
                              f"{model.ctx_size} tokens")
    step = ctx - len(bos) - 1
    chunks = [bos + ids[i:i + step + 1] for i in range(0, len(ids) - 1, step)]
    chunks = [c for c in chunks if len(c) - len(bos) >= 2]
    runs = [model] if reference is None else [model, reference]
    nll, ref_nll, agree, kl, scored = 0.0, 0.0, 0, 0.0, 0
    stats = model.reader.stats if model.reader is not None else None
    before = stats.snapshot() if stats is not None else None
    start = time.perf_counter()
    total = sum(len(c) - len(bos) - 1 for c in chunks)
    with tqdm(total=total, unit="tok", desc="eval", disable=not progress) as bar:
        for chunk in chunks:
            caches = [m.engine.new_cache(len(chunk)) for m in runs]
            for pos in range(len(chunk) - 1):
                logps = [log_softmax(m.engine.forward(np.array([chunk[pos]]), c)[-1])
                         for m, c in zip(runs, caches, strict=True)]
                if pos < len(bos):
                    continue  # a chunk's first token: predicted from BOS alone, not scored
                target = chunk[pos + 1]
                nll -= logps[0][target]
                scored += 1
                if reference is not None:
                    ref_nll -= logps[1][target]
                    agree += int(np.argmax(logps[0]) == np.argmax(logps[1]))
                    p_ref = np.exp(logps[1])
                    kl += float(np.sum(p_ref * (logps[1] - logps[0])))
                bar.update(1)
    seconds = time.perf_counter() - start
    io = stats.since(before) if stats is not None else None

    def per_token(value: float) -> float:
        return value / scored if io is not None else 0.0

    return EvalReport(
        tokens=scored, perplexity=float(np.exp(nll / scored)),
        top1_agreement=agree / scored if reference is not None else None,
        mean_kl=kl / scored if reference is not None else None,
        reference_perplexity=float(np.exp(ref_nll / scored)) if reference is not None else None,
        seconds=seconds,
        bytes_read_per_token=per_token(io.bytes_read if io else 0),
        neurons_needed_per_token=per_token(io.neurons_needed if io else 0),
        neuron_hits_per_token=per_token(io.neuron_hits if io else 0),
        neurons_read_per_token=per_token(io.neurons_read if io else 0),
        io_wait_ms_per_token=per_token(io.wait_seconds * 1000 if io else 0),
        cache_ms_per_token=per_token(io.cache_seconds * 1000 if io else 0))
