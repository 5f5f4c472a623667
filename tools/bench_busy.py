"""Decode speed on a busy machine: ours and llama.cpp, idle and with cores kept busy.

    python tools/bench_busy.py [-m MODEL] [--runs 5] [-t 2] [--hogs 1] [-n 64]
                               [--store-codec int8] [--skip-float] [--peers pure-iq4_nl ...]
                               [--json bench-results/busy.json] [--md bench-results/busy.md]

A laptop always has other work running. Each run times every engine back to back (order
alternating) on the same prompt and greedy decode twice: on the machine as it is ("idle"),
then with `--hogs` other processes spinning on the CPU ("busy"; unpinned, as a browser or a
compiler would be). Reports medians, and each engine's busy/idle ratio: how much of its
speed it keeps when it has to share. Engines: the cpu backend (onnxruntime for resident
matrices, numba FFNs where not prepared), the cpu backend with float activations (numba
kernels only) and llama.cpp on the same GGUF, all with the same `-t`; `--store-codec` picks
our store's codec, `--peers` adds llama.cpp on its own smaller quantizations of the model
(tools/bench_codecs.py's names).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

from bench_dense import llama_cpp, llama_peers, ours
from machine import describe_machine, machine_summary, save_results

HOG = "while True: pass"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-m", "--model", default=None, help="GGUF (default: embedded model)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("--hogs", type=int, default=1, help="busy processes in the busy runs")
    parser.add_argument("-n", "--decode-tokens", type=int, default=64)
    parser.add_argument("--store-codec", default="int8", help="codec of our store")
    parser.add_argument("--skip-float", action="store_true",
                        help="leave out our float-activation (numba only) engine")
    parser.add_argument("--peers", nargs="*", default=[],
                        help="also llama.cpp on these quantizations of the model")
    parser.add_argument("--json", type=Path, default=Path("bench-results/busy.json"))
    parser.add_argument("--md", type=Path, default=Path("bench-results/busy.md"))
    args = parser.parse_args()

    from flashinfer_ondevice.api import ensure_store
    from flashinfer_ondevice.default_model import default_model_path

    machine = describe_machine(sys.executable)
    gguf = Path(args.model) if args.model else default_model_path()
    store, t = str(ensure_store(gguf, args.store_codec)), args.threads
    main_engine = f"cpu backend ({args.store_codec} store)"
    workers = {main_engine: ours({"path": store, "threads": t, "selector": "dense"})}
    if not args.skip_float:
        workers["cpu backend, float activations (numba)"] = ours(
            {"path": store, "threads": t, "selector": "dense", "quality": "exact"})
    ids = workers[main_engine].ids
    workers["llama.cpp"] = llama_cpp(sys.executable, gguf, t)
    workers.update(llama_peers(sys.executable, gguf, args.peers, t))
    for worker in workers.values():
        worker.time(ids, 4)  # warm up
    samples = {n: {"idle": [], "busy": []} for n in workers}
    for run in range(args.runs):
        for condition in ("idle", "busy"):
            hogs = [subprocess.Popen([sys.executable, "-c", HOG])
                    for _ in range(args.hogs if condition == "busy" else 0)]
            try:
                order = list(workers.items())
                for name, worker in (order if run % 2 == 0 else order[::-1]):
                    samples[name][condition].append(worker.time(ids, args.decode_tokens)[1])
            finally:
                for hog in hogs:
                    hog.kill()
                    hog.wait()
    for worker in workers.values():
        worker.close()
    med = {n: {c: statistics.median(v) for c, v in s.items()} for n, s in samples.items()}
    kept = {n: med[n]["busy"] / med[n]["idle"] for n in samples}
    result = {"model": gguf.name, "threads": args.threads, "hogs": args.hogs,
              "runs": args.runs, "decode_tokens": args.decode_tokens, "machine": machine,
              "samples": samples, "median": med, "busy_over_idle": kept}
    rows = ["| engine | idle tok/s | busy tok/s | busy/idle | vs llama.cpp idle | "
            "vs llama.cpp busy |", "|---|---:|---:|---:|---:|---:|"]
    for name in samples:
        rows.append(f"| {name} | {med[name]['idle']:.1f} | {med[name]['busy']:.1f} | "
                    f"{kept[name]:.2f} | {med[name]['idle'] / med['llama.cpp']['idle']:.2f}x | "
                    f"{med[name]['busy'] / med['llama.cpp']['busy']:.2f}x |")
    table = (f"Machine: {machine_summary(machine)}\n\n{gguf.name}, decode tg{args.decode_tokens}, "
             f"{args.threads} threads, busy = {args.hogs} spinning process(es), "
             f"{args.runs} runs, alternating order\n\n" + "\n".join(rows) + "\n")
    save_results(result, table, args.json, args.md)


if __name__ == "__main__":
    main()
