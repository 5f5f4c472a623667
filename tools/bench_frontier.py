"""The frontier under a memory budget: speed and quality of our settings and of llama.cpp's
quantizations, every system under the same absolute limit.

    python tools/bench_frontier.py [-m MODEL.gguf] [--fractions 50 25]
                                   [--ours int8 pal4 quality=fastest ...] [--peers q4_0 ...]
                                   [--runs 3] [-n 16] [--quality-tokens 4096] [-t 2]

Limit = fraction x the source GGUF's bytes + one baseline (our process with the runtime
loaded), the same for every system, enforced by shared/tools/memlimit on a cold page cache.
Ours runs with `--memory-budget` = fraction x the GGUF's bytes (its own planner decides what
stays resident and which output-layer plan it uses); `quality=MODE` runs the source with
`--quality MODE`, choosing among the stores the other settings converted; llama.cpp (mmap,
its default) runs the shipped file and each ladder file (tools/bench_codecs.py's quantizer
names). Decode speed:
median of `--runs` cold runs, systems alternating. Quality beside each speed: the protocol of
tools/bench_codecs.py (512-token chunks, second halves scored) on the first
`--quality-tokens` held-out tokens, each of our settings at the plan its budget gives,
against the dequantized source. Writes a markdown table and JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from bench_codecs import CTX, LlamaSystem, Score, eval_text, log_softmax, quantize
from bench_peers import MEMLIMIT, PROMPT, llama_greedy_decode
from machine import describe_machine, machine_summary

ROOT = Path(__file__).resolve().parents[1]


def worker(system: str, model: str, budget: int, n: int, threads: int) -> dict:
    """Runs inside the memory limit: greedy decode of n tokens after the prompt."""
    if system == "llama.cpp":
        from llama_cpp import Llama

        llm = Llama(model, n_ctx=256, n_threads=threads, n_threads_batch=threads,
                    verbose=False)
        llm.eval(llm.tokenize(PROMPT.encode()))
        elapsed, read = llama_greedy_decode(llm, n)
        return {"tps": n / elapsed, "bytes_per_token": read / n}
    from flashinfer_ondevice.generate import prefill

    model_obj = load_ours(system, model, budget, threads, ctx_size=256)
    engine = model_obj.engine
    cache = engine.new_cache(256)
    token = int(prefill(engine, model_obj.tokenize(PROMPT), cache)[-1].argmax())
    stats = model_obj.reader.stats
    before, start = stats.snapshot(), time.perf_counter()
    for _ in range(n):
        token = int(engine.forward([token], cache)[-1].argmax())
    elapsed = time.perf_counter() - start
    return {"tps": n / elapsed, "bytes_per_token": stats.since(before).bytes_read / n,
            "plan": model_obj.plan.describe(open_store_for(model_obj.path)),
            "store": model_obj.path.name}


def split_head(spec: str) -> tuple[str, str]:
    """A setting's codec spec and its output-layer plan after a final "@" ("" if none; an
    "@" inside the spec splits the embedding by token, "embed=HOT@N/COLD")."""
    codec_spec, at, head = spec.rpartition("@")
    return (codec_spec, head) if at and head in ("auto", "exact", "shortlist") else (spec, "")


def load_ours(system: str, model: str, budget: int, threads: int, **kwargs):
    """Our setting: a store (run as its planner decides, or with the output-layer plan after
    "@"), or `quality=MODE` on the source, choosing among the stores of it in the models
    folder (runtime/store_choice.py)."""
    import flashinfer_ondevice as fi

    quality = system.partition("quality=")[2] or "auto"
    head = split_head(system)[1] or "auto"
    return fi.load(model, memory_budget=budget, threads=threads, quality=quality, head=head,
                   **kwargs)


def open_store_for(path):
    from flashinfer_ondevice.store.reader import open_store

    return open_store(path)


def run_limited(system: str, model: str, limit: int, budget: int, n: int, threads: int,
                timeout: float) -> dict:
    cmd = [str(MEMLIMIT), str(limit), "--cold", model, "--", sys.executable, __file__,
           "--worker", system, "-m", model, "--budget", str(budget), "-n", str(n), "-t",
           str(threads)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish {n} tokens in {timeout:.0f} s"}
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode == 0 and lines:
        return json.loads(lines[-1])
    said = [line for line in result.stderr.strip().splitlines() if line.strip()]
    return {"error": " | ".join(said[-2:])[-300:]}


def chunks_of(ids: list[int], bos: int) -> list[list[int]]:
    step = CTX - 1
    return [[bos] + ids[i:i + step] for i in range(0, len(ids) - step + 1, step)]


def quality(systems: dict, reference, ids: list[int], bos: int) -> dict[str, dict]:
    """Scores of `systems` (objects with .logits) and of the reference itself."""
    scores = {name: Score() for name in systems}
    ref_score = Score()
    for chunk in chunks_of(ids, bos):
        targets = np.array(chunk[CTX // 2 + 1:])
        ref = log_softmax(reference.logits(chunk)[CTX // 2:-1].astype(np.float64))
        ref_score.add(ref, ref, targets)
        for name, system in systems.items():
            logp = log_softmax(system.logits(chunk)[CTX // 2:-1].astype(np.float64))
            scores[name].add(logp, ref, targets)
    out = {name: s.result() for name, s in scores.items()}
    out["source"] = ref_score.result()
    return out


def quality_worker(system: str, model: str, source: str, budget: int, threads: int,
                   tokens: int) -> dict:
    """Our setting's quality, in a child of its own: the model is loaded under its budget
    first (the float32 reference, loaded after, must not count in the plan's memory)."""
    import flashinfer_ondevice as fi

    ours = load_ours(system, model, budget, threads, ctx_size=CTX)  # chunks of CTX tokens
    reference = fi.load(source, backend="reference", threads=threads)
    ids = reference.tokenize(eval_text(), add_special=False)[:tokens]
    result = quality({"ours": ours}, reference, ids, reference.tokenizer.bos_id)
    return {"quality": result["ours"], "source": result["source"], "store": ours.path.name}


def run_quality(kind: str, path: str, source: Path, budget: int, threads: int,
                tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--quality-worker", kind, "-m", path, "--source",
           str(source), "--budget", str(budget), "-t", str(threads), "--quality-tokens",
           str(tokens)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode == 0 and lines:
        return json.loads(lines[-1])
    return {"error": result.stderr.strip()[-300:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--fractions", type=float, nargs="+", default=[50, 25])
    parser.add_argument("--ours", nargs="*", default=[
        "int8", "pal4", "pal3,embed=pal4", "pal3", "quality=auto", "quality=fastest",
        "quality=exact"], help="store codec specs (SPEC@shortlist or @exact: that "
        "output-layer plan), and quality=MODE: the choice among the stores converted (those "
        "listed first)")
    parser.add_argument("--peers", nargs="*", default=["pure-iq4_nl", "pure-q4_0",
                                                       "q2_k:emb=q4_0"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("-n", type=int, default=16)
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("--quality-tokens", type=int, default=4096)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "frontier")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--quality-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--source", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.budget, args.n, args.threads)))
        return
    if args.quality_worker:
        print(json.dumps(quality_worker(args.quality_worker, args.model, args.source,
                                        args.budget, args.threads, args.quality_tokens)))
        return

    import flashinfer_ondevice as fi
    from flashinfer_ondevice.api import ensure_store
    from flashinfer_ondevice.default_model import default_model_path
    from flashinfer_ondevice.runtime.engine import process_baseline

    baseline = process_baseline()
    source = Path(args.model) if args.model else default_model_path()
    gguf_bytes = source.stat().st_size
    systems = {f"ours {spec}": (spec, str(source)) if spec.startswith("quality=") else
               ("ours" + (f"@{split_head(spec)[1]}" if split_head(spec)[1] else ""),
                str(ensure_store(source, split_head(spec)[0], progress=True)))
               for spec in args.ours}
    systems["llama.cpp source"] = ("llama.cpp", str(source))
    for name in args.peers:
        path = quantize(source, name, args.threads)
        if isinstance(path, Path):
            systems[f"llama.cpp {name}"] = ("llama.cpp", str(path))
    rows = []
    for fraction in args.fractions:
        budget = int(gguf_bytes * fraction / 100)
        limit = budget + baseline
        runs: dict[str, list[dict]] = {name: [] for name in systems}
        for run in range(args.runs):
            order = list(systems.items())
            for name, (kind, path) in (order if run % 2 == 0 else order[::-1]):
                runs[name].append(run_limited(kind, path, limit, budget, args.n,
                                              args.threads, args.timeout))
        for name, results in runs.items():
            ok = [r for r in results if "tps" in r]
            row = {"system": name, "fraction": fraction, "limit": limit, "budget": budget,
                   "runs": results}
            if ok:
                row["tps"] = statistics.median(r["tps"] for r in ok)
                row["bytes_per_token"] = statistics.median(r["bytes_per_token"] for r in ok)
                row["plan"] = ok[0].get("plan")
                row["store"] = ok[0].get("store")
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("runs", "plan")}),
                  flush=True)

    # llama.cpp's files are scored once (without a limit their logits do not depend on it);
    # ours per budget (the plan may change the output layer), each in a child process
    reference = fi.load(source, backend="reference", threads=args.threads)
    ids = reference.tokenize(eval_text(), add_special=False)[:args.quality_tokens]
    peers = {name: LlamaSystem(Path(path), args.threads)
             for name, (kind, path) in systems.items() if kind == "llama.cpp"}
    measured = quality(peers, reference, ids, reference.tokenizer.bos_id)
    del reference, peers
    for row in rows:
        kind, path = systems[row["system"]]
        if kind == "llama.cpp":
            row["quality"] = measured[row["system"]]
        else:
            child = run_quality(kind, path, source, row["budget"], args.threads,
                                args.quality_tokens)
            row["quality"] = child.get("quality")
            row["quality_store"] = child.get("store")
            row["quality_error"] = child.get("error")
        row["source_perplexity"] = measured["source"]["perplexity"]
        print(json.dumps({"system": row["system"], "fraction": row["fraction"],
                          "quality": row["quality"]}), flush=True)
    result = {"machine": describe_machine(), "model": source.name, "gguf_bytes": gguf_bytes,
              "baseline": baseline, "threads": args.threads, "runs": args.runs, "n": args.n,
              "quality_tokens": len(ids), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=1))
    table = render(result)
    Path(f"{args.out}.md").write_text(table)
    print(table)


def render(result: dict) -> str:
    lines = [f"Machine: {machine_summary(result['machine'])}", "",
             f"{result['model']} ({result['gguf_bytes'] / 1e6:.0f} MB); limit = fraction x "
             f"the GGUF + baseline {result['baseline'] / 1e6:.0f} MB for every system; "
             f"{result['threads']} threads; decode {result['n']} tokens, median of "
             f"{result['runs']} cold runs; quality on {result['quality_tokens']} held-out "
             "tokens against the dequantized source.", "",
             "| budget | system | limit MB | decode t/s | MB read/token | perplexity | vs "
             "source | mean KL | top-1 |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        chosen = f" (ran {r['store']})" if r.get("store") and "quality=" in r["system"] \
            else ""
        head = f"| {r['fraction']:.0f}% | {r['system']}{chosen} | {r['limit'] / 1e6:.0f} |"
        speed = (f" {r['tps']:.2f} | {r['bytes_per_token'] / 1e6:.1f} |" if "tps" in r else
                 f" failed: {r['runs'][0].get('error', '?')[:120]} | |")
        q = r.get("quality")
        tail = (f" {q['perplexity']:.3f} | {(q['perplexity'] / r['source_perplexity'] - 1):+.1%}"
                f" | {q['mean_kl']:.4f} | {q['top1_agreement']:.1%} |") if q else " | | | |"
        lines.append(head + speed + tail)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
