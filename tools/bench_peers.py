"""Decode speed and storage reads per token under a hard memory limit, against the peers.

    python tools/bench_peers.py [-m MODEL.gguf] [--codec int8|int4] [--fractions 100 50 25]
                                [--runs 3] [-n 16] [--llama-python PEER_VENV/bin/python]

Systems, each under shared/tools/memlimit with limit = fraction x its own model size + the
same baseline (our process with the runtime loaded: runtime.engine.process_baseline), cold
cache, 2 threads:
  ours      flash store (--codec), planner + direct I/O + prefetch (--memory-budget fraction%),
            with the runtime's default choices (dense FFNs unless calibrated sparsity pays)
  sparse    the same with gate-first FFN sparsity at the store's calibrated level and
            windowed neuron caches (calibrated stores only)
  llama.cpp llama-cpp-python with mmap (its default) on the GGUF
  naive     our runtime with nothing resident: every weight read every token
Also probes the device's direct-read bandwidth at the runtime's read size and reports the
runtime's achieved read bandwidth next to it. Writes a markdown table and JSON, both with the
machine they were measured on (tools/machine.py); --render rewrites the table of a saved
JSON under the machine recorded in it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import describe_machine, machine_summary

ROOT = Path(__file__).resolve().parents[1]
MEMLIMIT = ROOT.parent / "shared" / "tools" / "memlimit"
PROMPT = "The history of the city of Paris begins"


def proc_read_bytes() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("read_bytes")).split()[1])


def llama_greedy_decode(llm, n: int) -> tuple[float, int]:
    """Greedy-decode n tokens after what `llm` (a llama_cpp.Llama) has evaluated: (seconds,
    bytes this process read from storage meanwhile)."""
    token = llm.sample(temp=0)
    start_bytes, start = proc_read_bytes(), time.perf_counter()
    for _ in range(n):
        llm.eval([token])
        token = llm.sample(temp=0)
    return time.perf_counter() - start, proc_read_bytes() - start_bytes


def worker(system: str, model: str, fraction: float, n: int, threads: int) -> dict:
    """Runs inside the memory limit; prints one JSON line."""
    if system == "llama.cpp":
        from llama_cpp import Llama

        llm = Llama(model, n_ctx=256, n_threads=threads, n_threads_batch=threads,
                    verbose=False)
        llm.eval(llm.tokenize(PROMPT.encode()))
        elapsed, read = llama_greedy_decode(llm, n)
        return {"tps": n / elapsed, "bytes_per_token": read / n, "io_wait_per_token": None}
    import flashinfer_ondevice as fi
    from flashinfer_ondevice.generate import prefill

    model_obj = fi.load(model, memory_budget=f"{fraction}%", ctx_size=256, threads=threads,
                        stream_all=system == "naive",
                        selector={"ours": None, "sparse": "gate"}.get(system, "dense"))
    if system == "naive":
        assert model_obj.plan.resident_bytes < model_obj.plan.streamed_bytes / 50
    engine = model_obj.engine
    ids = model_obj.tokenize(PROMPT)
    cache = engine.new_cache(256)
    token = int(prefill(engine, ids, cache)[-1].argmax())
    stats = model_obj.reader.stats
    before, start = stats.snapshot(), time.perf_counter()
    for _ in range(n):
        token = int(engine.forward([token], cache)[-1].argmax())
    elapsed = time.perf_counter() - start
    io = stats.since(before)
    return {"tps": n / elapsed, "bytes_per_token": io.bytes_read / n,
            "io_wait_per_token": io.wait_seconds / n, "cache_per_token": io.cache_seconds / n,
            "read_bandwidth": io.bytes_read / elapsed,
            "sparse": model_obj.plan.sparse.describe() if model_obj.plan.sparse else None}


def probe_bandwidth(path: Path, seconds: float = 3.0) -> float:
    """GB/s of random aligned O_DIRECT reads of READ_CHUNK bytes, 16 in flight."""
    import random

    from flashinfer_ondevice.store.io import READ_CHUNK, DirectReader, aligned_buffer

    reader = DirectReader(path)
    size = path.stat().st_size // READ_CHUNK * READ_CHUNK
    buffer = aligned_buffer(16 * READ_CHUNK)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        offsets = [random.randrange(0, size // READ_CHUNK) * READ_CHUNK for _ in range(16)]
        reader.submit([(o, READ_CHUNK, i * READ_CHUNK) for i, o in enumerate(offsets)],
                      buffer).wait()
        done += 16 * READ_CHUNK
    reader.close()
    return done / (time.perf_counter() - start) / 1e9


def run_limited(system: str, model: str, cold: str, limit: int, fraction: float, n: int,
                threads: int, timeout: float, llama_python: str) -> dict:
    python = llama_python if system == "llama.cpp" else sys.executable
    cmd = [str(MEMLIMIT), str(limit), "--cold", cold, "--", python, __file__,
           "--worker", system, "-m", model, "--fraction", str(fraction), "-n", str(n),
           "-t", str(threads)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return {"rc": None, "error": f"did not finish {n} tokens in {timeout:.0f} s",
                "timed_out": True}
    result = subprocess.CompletedProcess(cmd, child.returncode, stdout, stderr)
    report = re.search(r"memlimit: rc=(\d+) limit=\d+ peak=(\d+) oom_kills=(\d+)",
                       result.stderr)
    row = {"rc": result.returncode, "cgroup_peak": int(report.group(2)) if report else None,
           "oom_kills": int(report.group(3)) if report else None}
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode == 0 and lines:
        row.update(json.loads(lines[-1]))
    else:
        # the worker's own last words (a budget refusal, a traceback's last line) before
        # memlimit's report
        said = [line for line in result.stderr.strip().splitlines()
                if line.strip() and not line.startswith("memlimit:")]
        report_line = (result.stderr.strip().splitlines() or ["?"])[-1]
        row["error"] = ((said[-1] + "; ") if said else "")[-300:] + report_line[-120:]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-m", "--model", default=None, help="GGUF (default: embedded model)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[100, 50, 25])
    parser.add_argument("--systems", nargs="+", default=["ours", "sparse", "llama.cpp", "naive"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baselines", nargs="+", default=["same", "own"],
                        choices=["same", "own"])
    parser.add_argument("--codec", default="int8", choices=["int8", "int4"],
                        help="codec of our store (int4 is the size class of Q4_K_M)")
    parser.add_argument("-n", type=int, default=16, help="decode tokens per run")
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("--llama-python", default=sys.executable,
                        help="Python of a venv whose llama-cpp-python build runs the llama.cpp "
                        "peer (default: this one's); see tools/bench_llama_builds.py")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "peers")
    parser.add_argument("--render", type=Path, default=None,
                        help="only rewrite the table from a saved JSON result")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--fraction", type=float, default=100, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.render:
        write_outputs(json.loads(args.render.read_text()), args.out)
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.fraction, args.n,
                                args.threads)))
        return

    from flashinfer_ondevice.api import ensure_store
    from flashinfer_ondevice.default_model import default_model_path
    from flashinfer_ondevice.runtime.engine import process_baseline
    from flashinfer_ondevice.store.reader import open_store

    baseline = process_baseline()

    machine = describe_machine(args.llama_python)
    gguf = Path(args.model) if args.model else default_model_path()
    store = ensure_store(gguf, args.codec, progress=True)
    store_size = (store / "weights.bin").stat().st_size
    if open_store(store).sparsity is None and "sparse" in args.systems:
        args.systems.remove("sparse")  # nothing calibrated to compare
    sizes = {"ours": store_size, "sparse": store_size, "naive": store_size,
             "llama.cpp": gguf.stat().st_size}
    probe = probe_bandwidth(store / "weights.bin")
    # The wording: the same interpreter baseline added to every limit. Ours includes
    # numba's JIT; llama.cpp's own process needs far less, so the "own" variant gives each
    # system exactly fraction x its model size above its own baseline.
    baselines = {"same": {s: baseline for s in args.systems},
                 "own": {s: baseline for s in args.systems}}
    baselines["own"]["llama.cpp"] = int(subprocess.check_output(
        [args.llama_python, "-c", "import os, llama_cpp; llama_cpp.llama_backend_init(); "
         "print(int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE'))"]))
    rows = []
    for fraction, variant, system in [(f, v, s) for f in args.fractions
                                      for v in args.baselines for s in args.systems]:
        if variant == "own" and system != "llama.cpp":
            continue  # identical to "same" for our runtime
        limit = int(sizes[system] * fraction / 100) + baselines[variant][system]
        model, cold = (str(gguf), str(gguf)) if system == "llama.cpp" else \
            (str(store), str(store))
        runs = []
        for _ in range(args.runs):
            runs.append(run_limited(system, model, cold, limit, fraction, args.n,
                                    args.threads, args.timeout, args.llama_python))
            if runs[-1].get("timed_out"):
                break  # one timeout says enough; do not spend another
        ok = [r for r in runs if "tps" in r]
        row = {"system": system if variant == "same" else f"{system} (own baseline)",
               "peer": system, "variant": variant, "fraction": fraction, "limit": limit,
               "runs": runs}
        if ok:
            row["tps"] = statistics.median(r["tps"] for r in ok)
            row["bytes_per_token"] = statistics.median(r["bytes_per_token"] for r in ok)
            if "read_bandwidth" in ok[0]:
                for key in ("read_bandwidth", "io_wait_per_token", "cache_per_token"):
                    row[key] = statistics.median(r[key] for r in ok)
                row["sparse"] = ok[0]["sparse"]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
    result = {"model": gguf.name, "codec": args.codec, "sizes": sizes, "baseline": baseline,
              "probe_gbps": probe, "threads": args.threads, "runs": args.runs,
              "machine": machine, "rows": rows}
    write_outputs(result, args.out)


def render(result: dict) -> str:
    """The markdown table of a benchmark result (as saved in the JSON)."""
    rows, sizes = result["rows"], result["sizes"]
    by = {(r["system"], r["fraction"]): r for r in rows}

    def ratios(r: dict, peer_name: str) -> str:
        peer = by.get((peer_name, r["fraction"]), {})
        if "tps" not in peer or r is peer:
            return "- | -"
        reads = (f"{r['bytes_per_token'] / peer['bytes_per_token']:.2f}x"
                 if peer["bytes_per_token"] else "(peer reads 0)")
        return f"{r['tps'] / peer['tps']:.2f}x | {reads}"

    lines = [f"Machine: {machine_summary(result.get('machine'))}", "",
             f"model {result['model']} (GGUF {sizes['llama.cpp'] / 1e6:.0f} MB, store "
             f"{sizes['ours'] / 1e6:.0f} MB {result.get('codec', 'int8')}); "
             f"baseline {result['baseline'] / 1e6:.0f} MB; "
             f"{result['threads']} threads; {result.get('runs', 3)} cold runs each, median; "
             f"direct-read probe {result['probe_gbps']:.2f} GB/s at 256 KiB x 16 in flight", "",
             "Limits: fraction x model size + baseline; llama.cpp with the same baseline as ours "
             "(the issue's rule), and with its own (python + llama_cpp) baseline.", "",
             "| budget | system | limit MB | decode t/s | MB read/token | t/s vs llama.cpp "
             "(same) | bytes vs llama.cpp (same) | t/s vs llama.cpp (own) | bytes vs llama.cpp "
             "(own) | t/s vs ours | bytes vs ours | read GB/s | ms/token: I/O wait, cache, "
             "rest |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        head = f"| {r['fraction']:.0f}% | {r['system']} | {r['limit'] / 1e6:.0f} |"
        if "tps" not in r:
            lines.append(f"{head} failed: {r['runs'][0].get('error', '?')} | | | | | | | | | |")
            continue
        bw = f"{r['read_bandwidth'] / 1e9:.2f}" if "read_bandwidth" in r else "-"
        split = "-"
        if "io_wait_per_token" in r:
            ms = 1000 / r["tps"]
            io, cache = r["io_wait_per_token"] * 1000, r["cache_per_token"] * 1000
            split = f"{io:.1f}, {cache:.1f}, {ms - io - cache:.1f}"
        lines.append(f"{head} {r['tps']:.2f} | {r['bytes_per_token'] / 1e6:.1f} | "
                     f"{ratios(r, 'llama.cpp')} | {ratios(r, 'llama.cpp (own baseline)')} | "
                     f"{ratios(r, 'ours')} | {bw} | {split} |")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out: Path) -> None:
    table = render(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.md").write_text(table)
    Path(f"{out}.json").write_text(json.dumps(result, indent=1))
    print(table)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
