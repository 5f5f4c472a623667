"""What the q8 KV cache costs in quality: perplexity, top-1 agreement and KL against f16.

    python tools/bench_kv_quality.py [-m MODEL] [--codec int8] [--text data/eval/gpl-3.txt]
                                     [--tokens 4096] [--ctx 2048] [-t 2]

Both runs use the same store, backend and settings; only the KV cache type differs. Text is
held-out evaluation text (never calibration text), scored one token at a time (the decode
path: the attention kernel reads the cache in place) in chunks of --ctx tokens, each a fresh
context, so the global layers attend over up to ctx positions and the window layers' rings
wrap. Writes a markdown table and JSON with the machine (tools/machine.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from machine import describe_machine, machine_summary, save_results

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-m", "--model", type=Path,
                        default=ROOT / "models" / "gemma-3-270m-q4_k_m.gguf")
    parser.add_argument("--codec", default="int8")
    parser.add_argument("--text", type=Path, default=ROOT / "data" / "eval" / "gpl-3.txt")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("--json", type=Path,
                        default=ROOT / "tools/bench-results/kv_quality.json")
    parser.add_argument("--md", type=Path, default=ROOT / "tools/bench-results/kv_quality.md")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import flashinfer_ondevice as fi
    from flashinfer_ondevice.evaluate import evaluate

    models = {t: fi.load(args.model, codec=args.codec, ctx_size=args.ctx, threads=args.threads,
                         cache_type=t) for t in ("f16", "q8")}
    text = args.text.read_text(encoding="utf-8")
    report = evaluate(models["q8"], text, args.ctx, args.tokens, models["f16"], progress=True)
    result = {"model": str(args.model), "codec": args.codec, "text": args.text.name,
              "ctx": args.ctx, "tokens": report.tokens, "threads": args.threads,
              "perplexity_f16": report.reference_perplexity, "perplexity_q8": report.perplexity,
              "perplexity_change": report.perplexity / report.reference_perplexity - 1,
              "top1_agreement": report.top1_agreement, "mean_kl": report.mean_kl,
              "machine": describe_machine()}
    table = "\n".join([
        f"KV cache q8 against f16 on {Path(args.model).name} ({args.codec} store), "
        f"{args.text.name}: {report.tokens} held-out tokens in {args.ctx}-token contexts, "
        "scored token by token", machine_summary(result["machine"]), "",
        "| KV cache | perplexity | change | top-1 agreement with f16 | KL(f16 \\|\\| q8) |",
        "|---|---|---|---|---|",
        f"| f16 | {result['perplexity_f16']:.4f} | | | |",
        f"| q8 | {result['perplexity_q8']:.4f} | {result['perplexity_change']:+.2%} | "
        f"{result['top1_agreement']:.2%} | {result['mean_kl']:.5f} |"])
    save_results(result, table, args.json, args.md)


if __name__ == "__main__":
    main()
