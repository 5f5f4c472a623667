"""Prompt and decode speed of the dense engine against llama.cpp, side by side.

    python tools/bench_dense.py [-m MODEL] [--runs 5] [-t 2] [--json out.json] [--md out.md]

Each run times both engines back to back (alternating which goes first) on the same prompt
and the same greedy 64-token decode, so machine noise hits both alike. Reports medians and
the ratio ours / llama.cpp.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

PROMPT = ("Python is a programming language that lets you work quickly and integrate systems "
          "more effectively. It is used for web development, data analysis, scripting and ")


def time_ours(model, ids: list[int], n_decode: int) -> tuple[float, float]:
    responses = list(model.stream(ids, max_tokens=n_decode + 1, temperature=0))
    return responses[-1].prompt_tps, responses[-1].generation_tps


def time_llama_cpp(llm, ids: list[int], n_decode: int) -> tuple[float, float]:
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    prompt_s = time.perf_counter() - start
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    start = time.perf_counter()
    for _ in range(n_decode):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return len(ids) / prompt_s, n_decode / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-m", "--model", default=None, help="GGUF (default: embedded model)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("-n", "--decode-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, default=Path("bench-results/dense.json"))
    parser.add_argument("--md", type=Path, default=Path("bench-results/dense.md"))
    args = parser.parse_args()

    from llama_cpp import Llama

    import flashinfer_ondevice as fi

    model = fi.load(args.model, threads=args.threads)
    llm = Llama(str(model.path), n_ctx=512, n_batch=512, n_threads=args.threads,
                n_threads_batch=args.threads, verbose=False)
    ids = model.tokenize(PROMPT)
    time_ours(model, ids, 4)  # warm both up
    time_llama_cpp(llm, ids, 4)
    samples: dict[str, list[float]] = {k: [] for k in
                                       ("ours_prompt", "ours_decode", "llama_prompt",
                                        "llama_decode")}
    for run in range(args.runs):
        order = [("ours", time_ours, model), ("llama", time_llama_cpp, llm)]
        for name, fn, engine in (order if run % 2 == 0 else order[::-1]):
            prompt_tps, decode_tps = fn(engine, ids, args.decode_tokens)
            samples[f"{name}_prompt"].append(prompt_tps)
            samples[f"{name}_decode"].append(decode_tps)
    med = {k: statistics.median(v) for k, v in samples.items()}
    sd = {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in samples.items()}
    result = {
        "model": str(model.path.name), "threads": args.threads, "runs": args.runs,
        "prompt_tokens": len(ids), "decode_tokens": args.decode_tokens,
        "machine": platform.processor() or platform.machine(), "samples": samples,
        "median": med, "decode_ratio": med["ours_decode"] / med["llama_decode"],
        "prompt_ratio": med["ours_prompt"] / med["llama_prompt"],
    }
    rows = [
        "| engine | test | t/s median | t/s sd | ratio vs llama.cpp |",
        "|---|---|---:|---:|---:|",
        f"| flashinfer-ondevice (numpy) | pp{len(ids)} | {med['ours_prompt']:.1f} | "
        f"{sd['ours_prompt']:.1f} | {result['prompt_ratio']:.2f}x |",
        f"| llama.cpp | pp{len(ids)} | {med['llama_prompt']:.1f} | {sd['llama_prompt']:.1f} |"
        " 1.00x |",
        f"| flashinfer-ondevice (numpy) | tg{args.decode_tokens} | {med['ours_decode']:.1f} | "
        f"{sd['ours_decode']:.1f} | {result['decode_ratio']:.2f}x |",
        f"| llama.cpp | tg{args.decode_tokens} | {med['llama_decode']:.1f} | "
        f"{sd['llama_decode']:.1f} | 1.00x |",
    ]
    table = (f"{model.path.name}, {args.threads} threads, {args.runs} runs each, "
             f"alternating\n\n" + "\n".join(rows) + "\n")
    for path, text in ((args.json, json.dumps(result, indent=2)), (args.md, table)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(table)


if __name__ == "__main__":
    main()
