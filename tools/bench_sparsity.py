"""Activation sparsity on held-out text: quality per selector and target sparsity, and the
neuron cache's reads per window under a memory budget.

    python tools/bench_sparsity.py [--store STORE] [-f data/eval/apache-2.0.txt]
        [--tokens 1000] [--io-tokens 64] [--budget 50%] [--out bench-results/sparsity]
        [--quality-from OLD.json]   # keep measured quality, redo only the I/O runs

Quality (fully resident, so only sparsity changes the result): perplexity, top-1 agreement
with the dense model and mean KL(dense || sparse) for each selector x target sparsity.
Windows do not change results (the same neurons are computed), only what is read: the dense
streaming runtime and each selector x sparsity x window run in a child process under the
budget, reporting neurons needed / cached / read and bytes read per token, with the time
split into I/O wait, cache management and the rest (compute). Writes a markdown table and JSON,
both with the machine they were measured on (tools/machine.py). Quality taken --quality-from
another machine, or from a result that does not say which, keeps its quality figures (the same
anywhere up to float rounding) but not their timings; the table names the machine it came from.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from machine import describe_machine, machine_summary, same_machine

ROOT = Path(__file__).resolve().parents[1]
SELECTORS = ("gate", "predicted")
WINDOWS = (1, 2, 4, 8)
IO_SPARSITIES = (0.05, 0.3, 0.5, 0.7)  # the default, and the three
# The timings in a quality row: unlike its quality figures, they depend on the machine.
QUALITY_TIMINGS = ("seconds", "io_wait_ms_per_token", "cache_ms_per_token")


def io_worker(store: str, text: str, selector: str, sparsity: float, window: int,
              budget: str, tokens: int) -> dict:
    import flashinfer_ondevice as fi
    from flashinfer_ondevice.evaluate import evaluate

    sparse = {} if selector == "dense" else {"sparsity": sparsity, "window": window}
    model = fi.load(store, memory_budget=budget, selector=selector, ctx_size=512, threads=2,
                    **sparse)
    report = evaluate(model, text, 512, tokens)
    ms = report.seconds / report.tokens * 1000
    return {"cache_rows": model.plan.cache_rows, "tps": report.tokens / report.seconds,
            "ms_per_token": ms, **report.as_dict()}


def measure_quality(store: str, text: str, tokens: int) -> list[dict]:
    """Each selector x calibrated target, fully resident, against the dense model."""
    import flashinfer_ondevice as fi
    from flashinfer_ondevice.evaluate import evaluate
    from flashinfer_ondevice.store.reader import open_store

    # float activations everywhere, so the differences are sparsity's
    reference = fi.load(store, selector="dense", ctx_size=512, threads=2, quality="exact")
    quality = []
    for selector in SELECTORS:
        for sparsity in open_store(store).sparsity.targets:
            model = fi.load(store, selector=selector, sparsity=sparsity, ctx_size=512, threads=2,
                            quality="exact")
            report = evaluate(model, text, 512, tokens, reference)
            quality.append({"selector": selector, "sparsity": sparsity,
                            "kept": report.neurons_needed_per_token
                            / (model.config.ffn_size * model.config.n_layers),
                            **report.as_dict()})
            print(json.dumps(quality[-1]), flush=True)
            del model
    return quality


def earlier_quality(path: Path, machine: dict) -> tuple[list[dict], dict | None]:
    """The quality rows of an earlier result and the machine that measured them (None where
    the result does not say). Rows from any other machine lose their timings."""
    earlier = json.loads(path.read_text())
    origin = earlier.get("quality_machine")
    if same_machine(origin, machine):
        return earlier["quality"], origin
    print(f"{path}: quality measured on {machine_summary(origin)}, this machine is "
          f"{machine_summary(machine)}; keeping the quality figures, dropping their timings",
          file=sys.stderr)
    return [{k: v for k, v in q.items() if k not in QUALITY_TIMINGS}
            for q in earlier["quality"]], origin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None, help="calibrated store [default model's]")
    parser.add_argument("-f", "--file", default=str(ROOT / "data/eval/apache-2.0.txt"))
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--io-tokens", type=int, default=64)
    parser.add_argument("--budget", default="50%")
    parser.add_argument("--out", default=str(ROOT / "bench-results/sparsity"),
                        help="writes OUT.json and OUT.md")
    parser.add_argument("--quality-from", type=Path, default=None,
                        help="take the quality rows from this earlier result")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    text = Path(args.file).read_text(encoding="utf-8")
    if args.worker:
        selector, sparsity, window, budget = args.worker
        print(json.dumps(io_worker(args.store, text, selector, float(sparsity), int(window),
                                   budget, args.io_tokens)))
        return

    from flashinfer_ondevice.api import ensure_store
    from flashinfer_ondevice.default_model import default_model_path
    from flashinfer_ondevice.store.reader import open_store

    machine = describe_machine()
    store = args.store or str(ensure_store(default_model_path()))
    if args.quality_from:
        quality, quality_machine = earlier_quality(args.quality_from, machine)
    else:
        quality, quality_machine = measure_quality(store, text, args.tokens), machine
    settings = [("dense", 0.0, 0)] + [(selector, sparsity, window) for selector in SELECTORS
                                      for sparsity in IO_SPARSITIES for window in WINDOWS]
    io = []
    for selector, sparsity, window in settings:  # dense streaming first, for the ratios
        out = subprocess.run(
            [sys.executable, __file__, "--store", store, "-f", args.file, "--io-tokens",
             str(args.io_tokens), "--worker", selector, str(sparsity), str(window),
             args.budget], capture_output=True, text=True, check=True)
        io.append({"selector": selector, "sparsity": sparsity, "window": window,
                   **json.loads(out.stdout.strip().splitlines()[-1])})
        print(json.dumps(io[-1]), flush=True)
    targets = open_store(store).sparsity.targets
    result = {"store": store, "text": args.file, "budget": args.budget, "targets": targets,
              "date": time.strftime("%Y-%m-%d"), "machine": machine,
              "quality_machine": quality_machine, "quality": quality, "io": io}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(render(result) + "\n")
    print(render(result))


def render(result: dict) -> str:
    lines = [f"Machine: {machine_summary(result['machine'])}", ""]
    if not same_machine(result["quality_machine"], result["machine"]):
        lines += ["Quality rows taken from an earlier run (their timings dropped), measured on: "
                  f"{machine_summary(result['quality_machine'])}", ""]
    lines += [f"Quality on {Path(result['text']).name} ({result['quality'][0]['tokens']} tokens "
              f"scored), fully resident; dense perplexity "
              f"{result['quality'][0]['reference_perplexity']:.3f}", "",
              "| selector | target sparsity | neurons kept | perplexity | ppl change | "
              "top-1 agreement | mean KL |", "|---|---|---|---|---|---|---|"]
    for q in result["quality"]:
        change = (q["perplexity"] / q["reference_perplexity"] - 1) * 100
        lines.append(f"| {q['selector']} | {q['sparsity']:.0%} | {q['kept']:.1%} | "
                     f"{q['perplexity']:.3f} | {change:+.2f}% | {q['top1_agreement']:.1%} | "
                     f"{q['mean_kl']:.4f} |")
    lines += ["", f"Neuron cache under a {result['budget']} budget "
              f"({result['io'][0]['tokens']} tokens, per token):", "",
              "| selector | sparsity | window | cache rows/layer | needed | cached | read | "
              "MB read | vs dense | ms/token | I/O wait ms | cache ms | compute ms |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    dense_bytes = next(r["bytes_read_per_token"] for r in result["io"]
                       if r["selector"] == "dense")
    for r in result["io"]:
        compute = r["ms_per_token"] - r["io_wait_ms_per_token"] - r["cache_ms_per_token"]
        lines.append(f"| {r['selector']} | {r['sparsity']:.0%} | {r['window'] or '-'} | "
                     f"{r['cache_rows']} | {r['neurons_needed_per_token']:.0f} | "
                     f"{r['neuron_hits_per_token']:.0f} | {r['neurons_read_per_token']:.0f} | "
                     f"{r['bytes_read_per_token'] / 1e6:.1f} | "
                     f"{r['bytes_read_per_token'] / dense_bytes:.2f}x | {r['ms_per_token']:.1f} | "
                     f"{r['io_wait_ms_per_token']:.1f} | {r['cache_ms_per_token']:.1f} | "
                     f"{compute:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
