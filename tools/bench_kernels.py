"""Products from codec bytes, per backend and shape: what each way of multiplying costs.

    python tools/bench_kernels.py [--backends cpu mlx numba] [--codecs int8 int4 bpal4] [-t 2]
                                  [--runs 15] [--json bench-results/kernels.json]
                                  [--md bench-results/kernels.md]

Shapes: Gemma 3 270M's attention, FFN and output layer, and the 7B geometry's (Qwen2-7B)
FFN matrices. Each cell is the median time of one product on random codec rows: `numba` is
the fused kernel on the bytes (streamed rows, what runs under a budget), a backend name is
its prepared resident form (`cpu`: onnxruntime's MatMulNBits with int8 activations; `mlx`:
MLX's quantized matmul). One token (decode) and 32 (prefill); GB/s counts the codec bytes.
This table is why the cpu backend prepares every resident int8/int4 matrix (onnxruntime is
faster at every shape); the runtime prepares the output layer 16 MB of rows at a time,
here it is one session.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from machine import describe_machine, machine_summary, save_results

SHAPES = {"gemma q (1024x640)": (1024, 640), "gemma ffn up (2048x640)": (2048, 640),
          "gemma output (262144x640)": (262144, 640), "7b up (18944x3584)": (18944, 3584),
          "7b down (3584x18944)": (3584, 18944)}
DISTINCT_ROWS = 1024  # rows encoded per matrix (then repeated)


def median_ms(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def time_products(backend_name: str, codec, raw: np.ndarray, cols: int, threads: int,
                  runs: int) -> tuple[float, float] | None:
    """(one token ms, 32 tokens ms) of `backend_name`'s products from `raw`, None where that
    backend does not prepare this codec."""
    from flashinfer_ondevice.backends import make_backend

    rng = np.random.default_rng(1)
    one = rng.standard_normal((1, cols)).astype(np.float32)
    batch = rng.standard_normal((32, cols)).astype(np.float32)
    if backend_name == "numba":  # the codec's fused kernel; prefill decodes rows for BLAS
        cpu = make_backend("cpu", threads)
        out = np.empty(len(raw), np.float32)
        return (median_ms(lambda: cpu.matvec(codec, raw, one[0], out), runs),
                median_ms(lambda: cpu.matmul(codec, raw, batch), max(3, runs // 5)))
    prepared = make_backend(backend_name, threads).prepare(codec, raw, cols)
    if prepared is None:
        return None
    return (median_ms(lambda: prepared.apply(one), runs),
            median_ms(lambda: prepared.apply(batch), max(3, runs // 5)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=["numba", "cpu"])
    parser.add_argument("--codecs", nargs="+", default=["int8", "int4"])
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--json", type=Path, default=Path("bench-results/kernels.json"))
    parser.add_argument("--md", type=Path, default=Path("bench-results/kernels.md"))
    args = parser.parse_args()

    import numba
    from threadpoolctl import threadpool_limits

    from flashinfer_ondevice.quant.codecs import codec

    numba.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    rng = np.random.default_rng(0)
    results = []
    for name, (rows, cols) in SHAPES.items():
        for codec_name in args.codecs:
            c = codec(codec_name)
            # DISTINCT_ROWS encoded rows repeated to the shape's size: the fitted codecs
            # (palettes) take minutes to encode a whole output layer; the kernels' time does
            # not depend on the values
            distinct = c.encode(rng.standard_normal((min(DISTINCT_ROWS, rows), cols))
                                .astype(np.float32))
            raw = np.ascontiguousarray(np.resize(distinct, (rows, distinct.shape[1])))
            for backend_name in args.backends:
                timed = time_products(backend_name, c, raw, cols, args.threads, args.runs)
                if timed is None:
                    continue
                decode, prefill = timed
                results.append({"shape": name, "codec": codec_name, "backend": backend_name,
                                "decode_ms": decode, "prefill32_ms": prefill,
                                "decode_gbps": raw.nbytes / decode / 1e6})
                print(results[-1], file=sys.stderr)
    rows_md = ["| shape | codec | backend | 1 token ms | GB/s | 32 tokens ms |",
               "|---|---|---|---:|---:|---:|"]
    rows_md += [f"| {r['shape']} | {r['codec']} | {r['backend']} | {r['decode_ms']:.3f} | "
                f"{r['decode_gbps']:.1f} | {r['prefill32_ms']:.2f} |" for r in results]
    machine = describe_machine(sys.executable)
    table = (f"Machine: {machine_summary(machine)}\n\n{args.threads} threads, median of "
             f"{args.runs} products\n\n" + "\n".join(rows_md) + "\n")
    save_results({"machine": machine, "threads": args.threads, "results": results}, table,
                 args.json, args.md)


if __name__ == "__main__":
    main()
