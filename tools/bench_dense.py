"""Prompt and decode speed with all memory available: our engines against llama.cpp.

    python tools/bench_dense.py [-m MODEL] [--runs 5] [-t 2] [--json out.json] [--md out.md]
                                [--llama-python PEER_VENV/bin/python] [--codecs int4 pal4 ...]
                                [--peers pure-iq4_nl ...]

Engines: the numpy reference on the GGUF, the cpu backend on the int8 store (resident
matrices in onnxruntime's MatMulNBits with int8 activations, FFN bundles in numba), the same
with float activations (`quality="exact"`: numba kernels only), the cpu backend with the
output layer's shortlist plan (approximate logits outside the best 1024 candidates; quality in
docs/benchmarks.md) and, for a calibrated store, gate-first FFN sparsity at the store's
calibrated default level; `--codecs` adds the cpu backend on stores of other codecs (their
quality: tools/bench_codecs.py), `--exact-codecs` the same with float activations (numba
kernels only). `--peers` adds llama.cpp on smaller quantizations of the model, made by its
own quantizer (tools/bench_codecs.py's names), the peers a user picks by size. Each run
times every engine back to back (order alternating) on the same prompt and greedy 64-token
decode, so machine noise hits all alike; every engine runs in a process of its own, as a
user runs one model (thread pools never meet another engine's).
Reports medians and ratios to llama.cpp, with the machine they were measured on
(tools/machine.py) in the JSON and above the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_codecs import quantize
from machine import describe_machine, machine_summary, save_results

PROMPT = ("Python is a programming language that lets you work quickly and integrate systems "
          "more effectively. It is used for web development, data analysis, scripting and ")


# Every engine runs in a child process of its own, as a user runs one model: thread pools
# (onnxruntime's process-wide one, numba's, llama.cpp's) never meet another engine's. A
# worker loads its engine, prints the prompt's token ids, then times each request it reads.
OURS_WORKER = """
import json, sys
import flashinfer_ondevice as fi
model = fi.load(**json.loads(sys.argv[1]))
print(json.dumps(model.tokenize(sys.argv[2])), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    responses = list(model.stream(request["ids"], max_tokens=request["n"] + 1, temperature=0))
    print(json.dumps([responses[-1].prompt_tps, responses[-1].generation_tps]), flush=True)
"""

# llama.cpp runs with the Python given by --llama-python, so the peer can be a faster build
# than the portable one this environment has (tools/bench_llama_builds.py).
LLAMA_WORKER = """
import json, sys, time
import numpy as np
from llama_cpp import Llama
llm = Llama(sys.argv[1], n_ctx=512, n_batch=512, n_threads=int(sys.argv[2]),
            n_threads_batch=int(sys.argv[2]), verbose=False)
print("[]", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    ids, n_decode = request["ids"], request["n"]
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    prompt_s = time.perf_counter() - start
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    start = time.perf_counter()
    for _ in range(n_decode):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    decode_s = time.perf_counter() - start
    print(json.dumps([len(ids) / prompt_s, n_decode / decode_s]), flush=True)
"""


SETTLE_S = 0.5  # pause before each timing: without it, the engine timed right after the numpy
# reference prefilled at half speed (that process's BLAS threads still spinning, measured)


class Worker:
    """An engine loaded once in a child process that times requests (prompt and greedy
    decode speed); `ids`: what it printed when ready (ours: the prompt's token ids)."""

    def __init__(self, argv: list[str]):
        self.child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True)
        self.ids = json.loads(self._line())

    def _line(self) -> str:
        line = self.child.stdout.readline()
        if not line:
            raise SystemExit(f"a benchmark worker died (exit {self.child.wait()}): "
                             f"{' '.join(self.child.args[:3])}")
        return line

    def time(self, ids: list[int], n_decode: int) -> tuple[float, float]:
        time.sleep(SETTLE_S)  # the previous engine's threads (BLAS, OpenMP) stop spinning
        self.child.stdin.write(json.dumps({"ids": ids, "n": n_decode}) + "\n")
        self.child.stdin.flush()
        prompt_tps, decode_tps = json.loads(self._line())
        return prompt_tps, decode_tps

    def close(self) -> None:
        self.child.stdin.close()
        self.child.wait()


def ours(load_arguments: dict) -> Worker:
    """Our engine, `fi.load(**load_arguments)` (JSON values), in a worker."""
    return Worker([sys.executable, "-c", OURS_WORKER, json.dumps(load_arguments), PROMPT])


def llama_cpp(python: str, gguf: Path, threads: int) -> Worker:
    """llama.cpp on the GGUF in a worker of the given Python."""
    return Worker([python, "-c", LLAMA_WORKER, str(gguf), str(threads)])

def llama_peers(python: str, gguf: Path, peers: list[str], threads: int) -> dict[str, Worker]:
    """llama.cpp on each of `peers` (tools/bench_codecs.py's quantization names, made by its
    own quantizer from the GGUF), a worker each; exits naming a type that cannot be made."""
    workers = {}
    for peer in peers:
        made = quantize(gguf, peer, threads)
        if isinstance(made, str):
            raise SystemExit(f"llama.cpp {peer}: {made}")
        workers[f"llama.cpp {peer}"] = llama_cpp(python, made, threads)
    return workers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-m", "--model", default=None, help="GGUF (default: embedded model)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("-n", "--decode-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, default=Path("bench-results/dense.json"))
    parser.add_argument("--md", type=Path, default=Path("bench-results/dense.md"))
    parser.add_argument("--llama-python", default=sys.executable,
                        help="Python of a venv whose llama-cpp-python build is the peer "
                        "(default: this one's); see tools/bench_llama_builds.py")
    parser.add_argument("--store-codec", default="int8",
                        help="codec of the store the cpu backend runs (int4 for the 7B geometry)")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["reference", "float", "shortlist"],
                        help="engines to leave out (the 7B geometry: its float32 reference needs "
                        "30 GB, and every engine holds its own copy of the weights)")
    parser.add_argument("--codecs", nargs="*", default=[],
                        help="also time the fast path on stores of these codec specs")
    parser.add_argument("--exact-codecs", nargs="*", default=[],
                        help="also time stores of these codec specs with float activations "
                        "(numba kernels only, as the float engine: codecs compared kernel for "
                        "kernel)")
    parser.add_argument("--peers", nargs="*", default=[],
                        help="also time llama.cpp on these quantizations of the model "
                        "(tools/bench_codecs.py's names, e.g. pure-iq4_nl)")
    args = parser.parse_args()

    from flashinfer_ondevice.api import ensure_store
    from flashinfer_ondevice.default_model import default_model_path
    from flashinfer_ondevice.store.reader import open_store

    machine = describe_machine(args.llama_python)
    gguf = Path(args.model) if args.model else default_model_path()
    store, t = str(ensure_store(gguf, args.store_codec)), args.threads
    engines = {}  # name -> fi.load arguments
    if "reference" not in args.skip:
        engines["numpy reference (GGUF)"] = {"path": str(gguf), "backend": "reference",
                                             "threads": t}
    engines[f"cpu backend ({args.store_codec} store)"] = {"path": store, "threads": t,
                                                          "selector": "dense"}
    if "float" not in args.skip:
        engines["cpu backend, float activations (numba only)"] = {
            "path": store, "threads": t, "selector": "dense", "quality": "exact"}
    if "shortlist" not in args.skip:
        engines["cpu backend + shortlist output layer"] = {
            "path": store, "threads": t, "selector": "dense", "head": "shortlist"}
    for spec in args.codecs:
        engines[f"fast path ({spec} store)"] = {"path": str(ensure_store(gguf, spec)),
                                                "threads": t, "selector": "dense"}
    for spec in args.exact_codecs:
        engines[f"float activations ({spec} store)"] = {
            "path": str(ensure_store(gguf, spec)), "threads": t, "selector": "dense",
            "quality": "exact"}
    record = open_store(store).sparsity
    if record is not None:  # asked for explicitly: by default this store runs dense
        sparsity = record.defaults["sparsity"]
        engines[f"fast path + gate-first {sparsity:.0%} sparsity"] = {
            "path": store, "threads": t, "selector": "gate", "sparsity": sparsity}
    workers = {name: ours(arguments) for name, arguments in engines.items()}
    ids = next(iter(workers.values())).ids
    workers["llama.cpp"] = llama_cpp(args.llama_python, gguf, t)
    workers.update(llama_peers(args.llama_python, gguf, args.peers, t))
    for worker in workers.values():
        worker.time(ids, 4)  # warm up
    samples: dict[str, dict[str, list[float]]] = {n: {"prompt": [], "decode": []}
                                                  for n in workers}
    for run in range(args.runs):
        order = list(workers.items())
        for name, worker in (order if run % 2 == 0 else order[::-1]):
            prompt_tps, decode_tps = worker.time(ids, args.decode_tokens)
            samples[name]["prompt"].append(prompt_tps)
            samples[name]["decode"].append(decode_tps)
    for worker in workers.values():
        worker.close()
    med = {n: {k: statistics.median(v) for k, v in s.items()} for n, s in samples.items()}
    sd = {n: {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in s.items()}
          for n, s in samples.items()}
    ratio = {n: {k: med[n][k] / med["llama.cpp"][k] for k in ("prompt", "decode")}
             for n in samples}
    result = {"model": gguf.name, "threads": args.threads, "runs": args.runs,
              "prompt_tokens": len(ids), "decode_tokens": args.decode_tokens,
              "machine": machine, "samples": samples,
              "median": med, "ratio_vs_llama_cpp": ratio}
    rows = ["| engine | test | t/s median | t/s sd | ratio vs llama.cpp |",
            "|---|---|---:|---:|---:|"]
    for kind, test in (("prompt", f"pp{len(ids)}"), ("decode", f"tg{args.decode_tokens}")):
        for name in samples:
            rows.append(f"| {name} | {test} | {med[name][kind]:.1f} | {sd[name][kind]:.1f} | "
                        f"{ratio[name][kind]:.2f}x |")
    table = (f"Machine: {machine_summary(machine)}\n\n{gguf.name}, {args.threads} threads, "
             f"{args.runs} runs each, alternating order\n\n" + "\n".join(rows) + "\n")
    save_results(result, table, args.json, args.md)


if __name__ == "__main__":
    main()
