"""llama.cpp's prompt and decode speed on the default model, one llama-cpp-python build against
another: the portable build the README installs beside a native (-march=native) build.

    python tools/bench_llama_builds.py BUILD=PYTHON [BUILD=PYTHON ...] [-m MODEL.gguf]
                                       [--runs 5] [-t 2] [--prompt-tokens 128] [-n 64]

Each BUILD=PYTHON names a build and the Python of a virtual environment where that build of
llama-cpp-python is installed (e.g. native=/tmp/venv-native/bin/python). Every run times each
build in a child process of its own, in alternating order, on the same prompt and greedy
decode, so machine noise hits all builds alike; a build that crashes on this CPU (an illegal
instruction: a negative exit status) is reported as such. Medians, and each build's ratio to
the first one named. Writes bench-results/llama_builds.{md,json} with the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from machine import describe_machine, machine_summary

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "data" / "eval" / "apache-2.0.txt"
WORKER = """
import json, sys, time
import llama_cpp
from llama_cpp import Llama
model, threads, prompt_tokens, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
text = open(sys.argv[5], encoding="utf-8").read()
llm = Llama(model, n_ctx=prompt_tokens + n + 8, n_batch=512, n_threads=threads,
            n_threads_batch=threads, verbose=False)
ids = llm.tokenize(text.encode())[:prompt_tokens]
start = time.perf_counter()
llm.eval(ids)
prompt_s = time.perf_counter() - start
token = llm.sample(temp=0)
start = time.perf_counter()
for _ in range(n):
    llm.eval([token])
    token = llm.sample(temp=0)
decode_s = time.perf_counter() - start
print(json.dumps({"prompt_tps": len(ids) / prompt_s, "decode_tps": n / decode_s,
                  "system_info": llama_cpp.llama_print_system_info().decode().strip()}))
"""


def run_build(python: str, model: Path, args) -> dict:
    child = subprocess.run(
        [python, "-c", WORKER, str(model), str(args.threads), str(args.prompt_tokens),
         str(args.n), str(TEXT)], capture_output=True, text=True, timeout=600)
    if child.returncode != 0:
        return {"error": f"exit {child.returncode}" + (" (killed by a signal: a negative exit "
                "is the signal's number; -4 is an illegal instruction)"
                if child.returncode < 0 else ""), "stderr": child.stderr[-500:]}
    return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("builds", nargs="+", help="NAME=PYTHON of each build")
    parser.add_argument("-m", "--model", type=Path, default=None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("-n", type=int, default=64, help="tokens decoded per run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    args = parser.parse_args()
    builds = dict(b.split("=", 1) for b in args.builds)
    if args.model is None:
        sys.path.insert(0, str(ROOT))
        from flashinfer_ondevice.default_model import default_model_path
        args.model = default_model_path()
    samples: dict[str, list[dict]] = {name: [] for name in builds}
    for run in range(args.runs):
        order = list(builds) if run % 2 == 0 else list(reversed(builds))
        for name in order:
            samples[name].append(run_build(builds[name], args.model, args))
            print(f"run {run + 1}/{args.runs} {name}: {samples[name][-1]}", file=sys.stderr)
    machine = describe_machine()
    rows, first = [], None
    for name, runs in samples.items():
        ok = [r for r in runs if "error" not in r]
        row = {"build": name, "python": builds[name], "runs": len(ok),
               "errors": [r["error"] for r in runs if "error" in r],
               "system_info": ok[0]["system_info"] if ok else None}
        for key in ("prompt_tps", "decode_tps"):
            values = [r[key] for r in ok]
            row[key] = statistics.median(values) if values else None
            row[key + "_spread"] = [min(values), max(values)] if values else None
        first = first or row
        rows.append(row)
    lines = [f"Machine: {machine_summary(machine)}", "",
             f"{args.model.name}, {args.threads} threads, prompt {args.prompt_tokens} tokens, "
             f"decode {args.n} tokens; medians of {args.runs} alternating runs", "",
             "| build | prompt tok/s | decode tok/s | vs first (prompt, decode) | runs | "
             "llama.cpp features |", "|---|---|---|---|---|---|"]
    for row in rows:
        if row["decode_tps"] is None:
            lines.append(f"| {row['build']} | crashed | crashed | - | 0 | {row['errors'][0]} |")
            continue
        ratio = ("-" if first["decode_tps"] is None else
                 f"{row['prompt_tps'] / first['prompt_tps']:.2f}x, "
                 f"{row['decode_tps'] / first['decode_tps']:.2f}x")
        features = " ".join(f.split(" = ")[0].strip() for f in
                            (row["system_info"] or "").split("|") if f.strip().endswith("= 1"))
        lines.append(f"| {row['build']} | {row['prompt_tps']:.1f} | {row['decode_tps']:.1f} | "
                     f"{ratio} | {row['runs']} | {features} |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "llama_builds.md").write_text(table + "\n")
    (args.out / "llama_builds.json").write_text(json.dumps(
        {"model": args.model.name, "machine": machine, "threads": args.threads,
         "prompt_tokens": args.prompt_tokens, "decode_tokens": args.n, "rows": rows,
         "samples": samples}, indent=1))


if __name__ == "__main__":
    main()
