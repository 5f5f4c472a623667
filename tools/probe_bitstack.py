"""Does BitStack pay on this model? Its decomposition against the palette codecs, per tensor
group, at equal bits per weight, before any kernel or store layout is built for it.

    python tools/probe_bitstack.py [-m MODEL.gguf] [--levels 2 3 4] [--ranks 1 16]
                                   [--groups attn ffn embed] [--out bench-results/bitstack]

(`--levels` with no value: the fixed codecs alone; the embedding group gets no BitStack.)

BitStack (Wang et al. 2024), as the research notes describe it: scale the matrix's columns
by the input's activation scale s_j = E[x_j^2]^(alpha/2) (folded back exactly afterwards),
then repeat: level = sign(R) * (rank-k approximation of |R|), R -= level. A level costs one
sign bit per weight plus float16 u, v: rows*cols/8 + 2k(rows+cols) bytes. Each setting
replaces one tensor group (all layers' attention or FFN matrices) of the float32 model; the
loss is the mean KL divergence of the next-token distributions from the float model's on a
held-out chunk (data/eval), the measure convert --bits uses (build/codec_choice.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from bench_codecs import eval_text
from machine import describe_machine, machine_summary

ROOT = Path(__file__).resolve().parents[1]


def bitstack(matrix: np.ndarray, scale: np.ndarray, levels: int, rank: int) -> np.ndarray:
    """The matrix rebuilt from `levels` BitStack levels of rank `rank`."""
    residual = matrix.astype(np.float64) * scale
    approx = np.zeros_like(residual)
    for _ in range(levels):
        signs = np.where(residual >= 0, 1.0, -1.0)
        magnitude = np.abs(residual)
        _, vectors = np.linalg.eigh(magnitude.T @ magnitude)  # right singular vectors
        v = vectors[:, ::-1][:, :rank]
        level = signs * ((magnitude @ v) @ v.T)
        residual -= level
        approx += level
    return (approx / scale).astype(np.float32)


def bitstack_transform(levels: int, rank: int, alpha: float):
    def transform(matrix, stats, by_columns=False):
        if stats is None or alpha == 0 or by_columns:
            scale = np.ones(matrix.shape[1])
        else:
            scale = stats.second_moment.astype(np.float64) ** (alpha / 2)
            scale = np.maximum(scale, 1e-6 * scale.max())
        return bitstack(matrix, scale / scale.mean(), levels, rank)
    return transform


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--levels", type=int, nargs="*", default=[2, 3, 4])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--groups", nargs="+", default=["attn", "ffn"],
                        choices=["attn", "ffn", "embed"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "bitstack")
    args = parser.parse_args()

    from flashinfer_ondevice.build import codec_choice
    from flashinfer_ondevice.build.calibrate import default_text
    from flashinfer_ondevice.build.convert import STATS_TOKENS, calibration_chunks
    from flashinfer_ondevice.build.input_stats import InputStatsCollector
    from flashinfer_ondevice.default_model import default_model_path
    from flashinfer_ondevice.loader import load_checkpoint
    from flashinfer_ondevice.quant.codecs import CODECS

    source = Path(args.model) if args.model else default_model_path()
    checkpoint = load_checkpoint(source)
    config, weights, tokenizer = checkpoint.config, checkpoint.weights, checkpoint.tokenizer
    chunks, _ = calibration_chunks(tokenizer, default_text(), STATS_TOKENS)
    collector = InputStatsCollector(config, weights, chunks, progress=True)
    layer_stats = [collector.layer(i, layer) for i, layer in enumerate(weights.layers)]
    head_stats = collector.head(weights.final_norm)
    held_out = np.array([tokenizer.bos_id] +
                        tokenizer.encode(eval_text(), add_special=False)[:511])
    reference = codec_choice.log_probs(config, weights, held_out)

    rows = []

    def measure(group: str, setting: str, transform, nbytes: int, values: int) -> None:
        variant = codec_choice.with_group(weights, group, transform, layer_stats, head_stats)
        kl = codec_choice.mean_kl(reference, codec_choice.log_probs(config, variant, held_out))
        rows.append({"group": group, "setting": setting, "bits_per_weight": nbytes * 8 / values,
                     "mean_kl": kl})
        print(json.dumps(rows[-1]), flush=True)

    h = config.hidden_size
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    shapes = {"attn": [(q, h), (kv, h), (kv, h), (h, q)],
              "ffn": [(config.ffn_size, h)] * 2 + [(h, config.ffn_size)],
              "embed": [(config.vocab_size, h)]}
    for group in args.groups:
        values = (1 if group == "embed" else config.n_layers) * sum(
            r * c for r, c in shapes[group])
        for name in ("int4", "pal4", "pal3", "pal2"):
            measure(group, name, codec_choice.round_trip(CODECS[name]),
                    codec_choice.group_nbytes(config, group, CODECS[name]), values)
        for levels in args.levels if group != "embed" else []:
            for rank in args.ranks:
                nbytes = config.n_layers * sum(levels * (r * c / 8 + 2 * rank * (r + c))
                                               for r, c in shapes[group])
                measure(group, f"bitstack {levels} levels, rank {rank}",
                        bitstack_transform(levels, rank, args.alpha), int(nbytes), values)
    result = {"machine": describe_machine(), "model": source.name, "alpha": args.alpha,
              "held_out_tokens": len(held_out), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=1))
    lines = [f"Machine: {machine_summary(result['machine'])}", "",
             f"{source.name}; one tensor group replaced at a time; mean KL against the float "
             f"model on {len(held_out)} held-out tokens; activation scale alpha {args.alpha}",
             "", "| group | setting | bits/weight | mean KL |", "|---|---|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["group"], r["bits_per_weight"])):
        lines.append(f"| {r['group']} | {r['setting']} | {r['bits_per_weight']:.2f} | "
                     f"{r['mean_kl']:.4f} |")
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
