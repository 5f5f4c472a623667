"""Decode speed and peak memory against the context length: ours against llama.cpp.

    python tools/bench_context.py [-m MODEL.gguf] [--codec int8] [--contexts 256 2048 8192]
                                  [--cache-types f16 q8] [--fractions 0 50] [-n 32]
                                  [--runs 3] [-t 2] [--llama-python PEER_VENV/bin/python]

Each cell is a fresh child process: a prompt of N tokens (the Apache license text, held-out
evaluation text, repeated), then greedy decode of n tokens; the context is N + n + 1 for both
systems. Ours: the store of --codec with `--cache-type` f16 or q8; llama.cpp (mmap, its
defaults) on the GGUF with `type_k`/`type_v` F16 or Q8_0 (a quantized V cache needs its flash
attention, so q8 runs with flash_attn on). Fraction 0 runs without a limit; a fraction F runs
under shared/tools/memlimit with limit = F% of the GGUF's bytes + one baseline (our process
with the runtime loaded), cold page cache, the same for both, ours with --memory-budget F% of
the GGUF (where the context's KV cache does not fit, ours spills the oldest global-layer KV
to flash: the table shows what it reads back per token, part of the bytes read). `--hogs K`
keeps K other processes spinning on the CPU during every cell (a busy laptop). Reports
medians over --runs (systems alternating), peak RSS (and the cgroup's peak under a limit),
bytes read from storage per decoded token, and ratios to llama.cpp.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_peers import MEMLIMIT, llama_greedy_decode, proc_read_bytes
from machine import describe_machine, machine_summary, save_results

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "data" / "eval" / "apache-2.0.txt"
LLAMA_TYPES = {"f16": 1, "q8": 8}  # GGML_TYPE_F16, GGML_TYPE_Q8_0


def prompt_ids(tokenize, n: int) -> list[int]:
    text = TEXT.read_text(encoding="utf-8")
    ids = tokenize(text)
    while len(ids) < n:
        ids = tokenize(text * (2 * n // max(len(ids), 1) + 1))
    return ids[:n]


def worker(system: str, model: str, codec: str, ctx: int, cache_type: str, budget: int | None,
           n: int, threads: int) -> dict:
    """Runs in the child: prompt of ctx tokens, n greedy tokens; one JSON line."""
    if system == "llama.cpp":
        from llama_cpp import Llama

        llm = Llama(model, n_ctx=ctx + n + 1, n_batch=512, n_threads=threads,
                    n_threads_batch=threads, type_k=LLAMA_TYPES[cache_type],
                    type_v=LLAMA_TYPES[cache_type], flash_attn=cache_type == "q8",
                    verbose=False)
        ids = prompt_ids(lambda t: llm.tokenize(t.encode()), ctx)
        start = time.perf_counter()
        llm.eval(ids)
        prompt_s = time.perf_counter() - start
        decode_s, read = llama_greedy_decode(llm, n)
        bytes_per_token = read / n
        spill: dict = {}
    else:
        import flashinfer_ondevice as fi

        m = fi.load(model, codec=codec, memory_budget=budget, ctx_size=ctx + n + 1,
                    threads=threads, cache_type=cache_type)
        ids = prompt_ids(m.tokenize, ctx)
        stream = m.stream(ids, max_tokens=n + 1, temperature=0)
        last = next(stream)  # after the prompt
        read = proc_read_bytes()
        for last in stream:  # noqa: B007 (the last response's totals)
            pass
        prompt_s, decode_s = ctx / last.prompt_tps, n / last.generation_tps
        bytes_per_token = (proc_read_bytes() - read) / n
        resident = m.plan.kv_resident_tokens if m.plan is not None else None
        spill = {"kv_resident": resident, "kv_spill_per_token": last.kv_bytes_read / n}
    return {"prompt_tps": ctx / prompt_s, "decode_tps": n / decode_s,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "bytes_per_token": bytes_per_token, **spill}


def run_cell(system: str, args, ctx: int, cache_type: str, fraction: float, baseline: int,
             gguf_bytes: int) -> dict:
    python = args.llama_python if system == "llama.cpp" else sys.executable
    budget = int(fraction / 100 * gguf_bytes) if fraction else None
    cmd = [python, __file__, "--worker", system, "-m", str(args.model), "--codec", args.codec,
           "--ctx", str(ctx), "--cache-type", cache_type, "-n", str(args.n),
           "-t", str(args.threads), "--budget", str(budget or 0)]
    limit = budget + baseline if budget else None
    if limit:
        cmd = [str(MEMLIMIT), str(limit), "--cold", str(args.model), "--", *cmd]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        stdout, stderr = child.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return {"error": f"timed out after {args.timeout:.0f} s"}
    row: dict = {"limit": limit}
    report = re.search(r"memlimit: rc=(\d+) limit=\d+ peak=(\d+) oom_kills=(\d+)", stderr)
    if report:
        row.update(cgroup_peak=int(report.group(2)), oom_kills=int(report.group(3)))
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if child.returncode == 0 and lines:
        row.update(json.loads(lines[-1]))
    else:
        said = [line for line in stderr.strip().splitlines()
                if line.strip() and not line.startswith("memlimit:")]
        row["error"] = f"rc={child.returncode}: " + (said[-1][-300:] if said else "")
    return row


def median_row(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[-1]["error"]}
    row = {key: statistics.median(r[key] for r in ok)
           for key in ("prompt_tps", "decode_tps", "peak_rss", "bytes_per_token")}
    row["decode_runs"] = [round(r["decode_tps"], 2) for r in ok]
    if "kv_spill_per_token" in ok[0]:
        row["kv_spill_per_token"] = statistics.median(r["kv_spill_per_token"] for r in ok)
        row["kv_resident"] = ok[0]["kv_resident"]
    if "cgroup_peak" in ok[0]:
        row["cgroup_peak"] = max(r["cgroup_peak"] for r in ok)
    return row


def render(result: dict) -> str:
    busy = f", {result['hogs']} busy processes" if result.get("hogs") else ""
    lines = [f"Context sweep on {Path(result['model']).name}, store {result['codec']}, "
             f"{result['threads']} threads{busy}, median of {result['runs']} runs, greedy "
             f"{result['n']} tokens after an N-token prompt",
             machine_summary(result["machine"]), "",
             "| N | KV | limit | system | decode t/s | vs llama.cpp | vs own N=first | "
             "prompt t/s | peak RSS MB | cgroup peak MB | MB read/token | of which KV spill |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    first: dict = {}
    for cell in result["cells"]:
        peer = next((c for c in result["cells"] if c["system"] == "llama.cpp"
                     and (c["ctx"], c["cache_type"], c["fraction"])
                     == (cell["ctx"], cell["cache_type"], cell["fraction"])), None)
        key = (cell["system"], cell["cache_type"], cell["fraction"])
        limit = f"{cell['fraction']:.0f}%" if cell["fraction"] else "none"
        head = f"| {cell['ctx']} | {cell['cache_type']} | {limit} | {cell['system']} |"
        if "error" in cell:
            lines.append(f"{head} {cell['error'][:80]} | | | | | | | |")
            continue
        first.setdefault(key, cell["decode_tps"])
        ratio = (f"{cell['decode_tps'] / peer['decode_tps']:.2f}x"
                 if peer and "error" not in peer and peer is not cell else "")
        cgroup = f"{cell['cgroup_peak'] / 1e6:.0f}" if "cgroup_peak" in cell else ""
        spill = "" if not cell.get("kv_resident") else \
            f"{cell['kv_spill_per_token'] / 1e6:.2f} (last {cell['kv_resident']} resident)"
        lines.append(f"{head} {cell['decode_tps']:.1f} | {ratio} | "
                     f"{cell['decode_tps'] / first[key]:.2f} | {cell['prompt_tps']:.0f} | "
                     f"{cell['peak_rss'] / 1e6:.0f} | {cgroup} | "
                     f"{cell['bytes_per_token'] / 1e6:.2f} | {spill} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-m", "--model", type=Path,
                        default=ROOT / "models" / "gemma-3-270m-q4_k_m.gguf")
    parser.add_argument("--codec", default="int8")
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 2048, 8192])
    parser.add_argument("--cache-types", nargs="+", default=["f16", "q8"],
                        choices=list(LLAMA_TYPES))
    parser.add_argument("--fractions", type=float, nargs="+", default=[0])
    parser.add_argument("-n", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--hogs", type=int, default=0, help="busy processes during each cell")
    parser.add_argument("--llama-python", default=sys.executable)
    parser.add_argument("--json", type=Path, default=ROOT / "tools/bench-results/context.json")
    parser.add_argument("--md", type=Path, default=ROOT / "tools/bench-results/context.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--ctx", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cache-type", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, str(args.model), args.codec, args.ctx,
                                args.cache_type, args.budget or None, args.n, args.threads)))
        return
    sys.path.insert(0, str(ROOT))
    from flashinfer_ondevice.runtime.engine import process_baseline

    baseline, gguf_bytes = process_baseline(), args.model.stat().st_size
    systems = ["ours", "llama.cpp"]
    cells = [(f, c, t) for f in args.fractions for c in args.contexts for t in args.cache_types]
    runs: dict = {}
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(args.hogs)]
    try:
        measure(args, cells, systems, baseline, gguf_bytes, runs)
    finally:
        for hog in hogs:
            hog.kill()
    result = {"model": str(args.model), "codec": args.codec, "threads": args.threads,
              "runs": args.runs, "n": args.n, "baseline": baseline, "hogs": args.hogs,
              "machine": describe_machine(args.llama_python),
              "cells": [{"system": s, "fraction": f, "ctx": c, "cache_type": t,
                         **median_row(rows)} for (s, f, c, t), rows in runs.items()]}
    result["cells"].sort(key=lambda c: (c["fraction"], c["cache_type"], c["ctx"],
                                        c["system"] != "ours"))
    save_results(result, render(result), args.json, args.md)


def measure(args, cells: list, systems: list[str], baseline: int, gguf_bytes: int,
            runs: dict) -> None:
    """Every cell, --runs times, systems alternating; rows appended to runs[cell]."""
    for r in range(args.runs):
        for fraction, ctx, cache_type in cells:
            for system in systems if r % 2 == 0 else systems[::-1]:
                row = run_cell(system, args, ctx, cache_type, fraction, baseline, gguf_bytes)
                print(f"run {r + 1}: N={ctx} {cache_type} {fraction:.0f}% {system}: "
                      + (row.get("error") or f"{row['decode_tps']:.1f} t/s, peak "
                         f"{row['peak_rss'] / 1e6:.0f} MB"), file=sys.stderr, flush=True)
                runs.setdefault((system, fraction, ctx, cache_type), []).append(row)


if __name__ == "__main__":
    main()
