"""One profile cell, run in a fresh child process: `python -m flashinfer_ondevice.profiler.cell
SPEC` prints one JSON line.

Kinds of cell (SPEC["kind"]):
  speed    ours: load under the budget with a setting, a prompt of `prompt_tokens`, greedy
           decode of `n` tokens; decode/prompt speed, time to first token, bytes read per
           token (the process's own I/O counters), the per-token split into I/O wait /
           cache management / compute, the plan, and the configuration the logits came from
           (what quality is measured for). A budget the planner refuses is a result, not an
           error.
  peer     llama.cpp (llama-cpp-python, mmap) on a GGUF: the same prompt and token count.
  quality  perplexity, top-1 agreement and KL against the exact model on held-out text, for
           one configuration (ours) or perplexity for a GGUF (llama.cpp).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import FlashInferError
from ..memory import peak_rss_bytes
from ..runtime.planner import BudgetError, Plan

RESIDENT_BUDGET = 1 << 40  # a budget that holds every weight: a budgeted run's kernels, no
# storage reads (what quality and the compute part of a prediction are measured with)


def read_bytes() -> int:
    """Bytes this process has read from storage (Linux; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def prompt_ids(tokenize, text: str, n: int) -> list[int]:
    """The first `n` tokens of `text` (repeated as needed)."""
    ids = tokenize(text)
    while len(ids) < n:
        text += "\n" + text
        ids = tokenize(text)
    return ids[:n]


def speed(spec: dict) -> dict:
    from ..api import load

    try:
        model = load(spec["model"], memory_budget=spec["budget"], ctx_size=spec["ctx"],
                        threads=spec["threads"], **spec["load"])
    except BudgetError as error:
        return {"status": "refused", "message": str(error), "smallest": error.smallest}
    text = Path(spec["prompt_file"]).read_text(encoding="utf-8")
    ids = prompt_ids(lambda t: model.tokenize(t, add_special=False), text,
                     spec["prompt_tokens"])
    n = spec["n"]
    start = time.perf_counter()
    stream = model.stream(ids, max_tokens=n + 1, temperature=0)
    first = next(stream)
    ttft = time.perf_counter() - start
    read_start, decode_start = read_bytes(), time.perf_counter()
    last = first
    for last in stream:  # noqa: B007 (the totals are on the last response)
        pass
    seconds = time.perf_counter() - decode_start
    decoded = max(last.generation_tokens - 1, 1)
    io_wait = (last.io_wait - first.io_wait) / decoded
    cache = (last.cache_time - first.cache_time) / decoded
    return {
        "status": "ok", "decode_tps": decoded / seconds, "prompt_tps": first.prompt_tps,
        "ttft_s": ttft, "bytes_per_token": (read_bytes() - read_start) / decoded,
        "io_wait_ms": io_wait * 1000, "cache_ms": cache * 1000,
        "compute_ms": max(0.0, seconds / decoded - io_wait - cache) * 1000,
        "kv_spill_per_token": last.kv_bytes_read / decoded, "peak_rss": peak_rss_bytes(),
        "config": config_of(model.path, model.plan, spec["load"]),
        "plan": plan_record(model.plan)}


def config_of(store: Path, plan: Plan | None, load: dict) -> dict:
    """The configuration the logits come from: what quality is measured for. `budgeted`:
    whether it ran under a budget (without one the cpu backend multiplies resident matrices
    with int8 activations, which changes the logits a little)."""
    sparse = plan.sparse if plan is not None else None
    return {"store": str(store), "cache_type": load.get("cache_type", "f16"),
            "budgeted": plan is not None and plan.budget is not None,
            "head": "shortlist" if plan is not None and plan.shortlist else "exact",
            "selector": sparse.selector if sparse else "dense",
            "sparsity": sparse.sparsity if sparse else None,
            "window": sparse.window if sparse else None,
            "quality": load.get("quality", "auto"), "backend": load.get("backend", "cpu"),
            "gpu_memory_budget": load.get("gpu_memory_budget")}


def plan_record(plan: Plan | None) -> dict | None:
    if plan is None:
        return None
    head_rows = plan.head_resident_rows
    return {"resident_bytes": plan.resident_bytes, "streamed_bytes": plan.streamed_bytes,
            "kv_bytes": plan.kv_bytes, "kv_resident_tokens": plan.kv_resident_tokens,
            "smallest_budget": plan.fixed_bytes, "shortlist": plan.shortlist,
            "prefill_batch": plan.prefill_batch, "head_resident_rows": head_rows,
            "device_bytes": plan.device_bytes, "head_device_rows": plan.head_device_rows}


def peer(spec: dict) -> dict:
    from llama_cpp import Llama

    llm = Llama(spec["model"], n_ctx=spec["ctx"], n_threads=spec["threads"],
                n_threads_batch=spec["threads"], verbose=False)
    text = Path(spec["prompt_file"]).read_text(encoding="utf-8")
    ids = prompt_ids(lambda t: llm.tokenize(t.encode(), add_bos=False), text,
                     spec["prompt_tokens"])
    start = time.perf_counter()
    llm.eval(ids)
    token = llm.sample(temp=0)
    ttft = time.perf_counter() - start
    read_start, decode_start = read_bytes(), time.perf_counter()
    for _ in range(spec["n"]):
        llm.eval([token])
        token = llm.sample(temp=0)
    seconds = time.perf_counter() - decode_start
    return {"status": "ok", "decode_tps": spec["n"] / seconds, "prompt_tps": len(ids) / ttft,
            "ttft_s": ttft, "bytes_per_token": (read_bytes() - read_start) / spec["n"],
            "peak_rss": peak_rss_bytes()}


def quality(spec: dict) -> dict:
    """Ours: the configuration's perplexity, top-1 agreement and KL against the exact model
    (every logit exact, float activations, dense FFN). A GGUF (llama.cpp): perplexity."""
    text = Path(spec["text_file"]).read_text(encoding="utf-8")
    if spec.get("gguf"):
        return {"status": "ok", **_llama_perplexity(spec, text)}
    from ..api import load
    from ..evaluate import evaluate

    config = spec["config"]
    model = load(config["store"], ctx_size=spec["ctx"], threads=spec["threads"],
                 memory_budget=RESIDENT_BUDGET if config["budgeted"] else None,
                 head=config["head"], selector=config["selector"],
                 sparsity=config["sparsity"], window=config["window"],
                 cache_type=config["cache_type"], quality=config["quality"],
                 backend=config["backend"], gpu_memory_budget=config["gpu_memory_budget"])
    reference = load(spec["reference"], ctx_size=spec["ctx"], threads=spec["threads"],
                     selector="dense", head="exact", quality="exact")
    report = evaluate(model, text, spec["ctx"], spec["tokens"], reference)
    return {"status": "ok", "tokens": report.tokens, "perplexity": report.perplexity,
            "top1_agreement": report.top1_agreement, "mean_kl": report.mean_kl}


SCORE_ROWS = 32  # positions whose log-softmax is computed at once


def _llama_perplexity(spec: dict, text: str) -> dict:
    """Perplexity of llama.cpp on a GGUF, chunked as evaluate() chunks (BOS + ctx - 1)."""
    from llama_cpp import Llama

    ctx = spec["ctx"]
    llm = Llama(spec["gguf"], n_ctx=ctx, n_threads=spec["threads"],
                n_threads_batch=spec["threads"], logits_all=True, verbose=False)
    ids = llm.tokenize(text.encode(), add_bos=False)[:spec["tokens"] + 1]
    bos = [llm.token_bos()]
    step = ctx - 2
    nll, scored = 0.0, 0
    for i in range(0, len(ids) - 1, step):
        chunk = bos + ids[i:i + step + 1]
        if len(chunk) < 3:
            break
        llm.reset()
        llm.eval(chunk[:-1])
        # positions 1.. (BOS's prediction is not scored), a block of rows at a time: a row
        # is the whole vocabulary (262k floats for Gemma 3)
        for start in range(1, len(chunk) - 1, SCORE_ROWS):
            end = min(start + SCORE_ROWS, len(chunk) - 1)
            rows = np.array(llm.scores[start:end], dtype=np.float32)
            top = rows.max(axis=1)
            lse = top + np.log(np.exp(rows - top[:, None]).sum(axis=1))
            nll -= float((rows[np.arange(end - start), chunk[start + 1:end + 1]] - lse).sum())
        scored += len(chunk) - 2
    return {"tokens": scored, "perplexity": float(np.exp(nll / scored)),
            "top1_agreement": None, "mean_kl": None}


def compute(spec: dict) -> dict:
    """Decode seconds per token of a configuration with every weight resident (under a
    budget if it ran under one: the kernels a budget runs), no storage reads: the compute
    part of a prediction."""
    from ..api import load

    config = spec["config"]
    model = load(config["store"], ctx_size=spec["ctx"],
                 memory_budget=RESIDENT_BUDGET if config["budgeted"] else None,
                 threads=spec["threads"], head=config["head"], selector=config["selector"],
                 sparsity=config["sparsity"], window=config["window"],
                 cache_type=config["cache_type"], backend=config["backend"],
                 gpu_memory_budget=config["gpu_memory_budget"])
    text = Path(spec["prompt_file"]).read_text(encoding="utf-8")
    ids = prompt_ids(lambda t: model.tokenize(t, add_special=False), text,
                     spec["prompt_tokens"])
    last = None
    for last in model.stream(ids, max_tokens=spec["n"] + 1, temperature=0):  # noqa: B007
        pass
    return {"status": "ok", "compute_s": 1.0 / last.generation_tps}


def plan(spec: dict) -> dict:
    """The plan load() would run with under the budget, reading no weight (a fresh process:
    the plan depends on what the process holds above its baseline)."""
    from ..api import plan as plan_for

    try:
        planned = plan_for(spec["model"], memory_budget=spec["budget"], ctx_size=spec["ctx"],
                           progress=False, **spec["load"])
    except BudgetError as error:
        return {"status": "refused", "message": str(error), "smallest": error.smallest}
    return {"status": "planned", "plan": plan_record(planned.plan),
            "config": config_of(planned.store.path, planned.plan, spec["load"])}


KINDS = {"speed": speed, "peer": peer, "quality": quality, "compute": compute, "plan": plan}


def main() -> None:
    spec = json.loads(sys.argv[1])
    try:
        result = KINDS[spec["kind"]](spec)
    except FlashInferError as error:
        result = {"status": "error", "message": str(error)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
