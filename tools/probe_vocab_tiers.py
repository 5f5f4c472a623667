"""Does a tied embedding pay for precision by token? Rows of the tokens the model predicts
most kept in a wide codec, the rest in a narrow one, measured before any store layout or
kernel is built for it.

    python tools/probe_vocab_tiers.py [-m MODEL.gguf] [--tokens 20480]
        [--systems "bpal4|bpal3" "bpal4|bpal4@32768/bpal2" ...]
        [--out bench-results/vocab-tiers]

A system is `LINEAR|EMBED`. LINEAR is the codec of the attention and FFN matrices, or
`ATTN/FFN` for two. EMBED is one codec, or `HOT@N/COLD`: the N tokens with the highest
mean predicted probability on the calibration text (the float model's softmax averaged over
convert's 8,192 statistics tokens) in codec HOT, every other token in COLD. Every matrix
is taken from the store convert writes for that codec (converted here if missing), decoded
to float32: each row of a codec is fitted alone, so a row taken from the bpal2 store is the
row a tiered store would hold. The model then runs in float32 on the decoded weights (the
numba kernels' float activations; the onnxruntime fast path rounds activations to int8).

Protocol and reference as tools/bench_codecs.py: held-out text (data/eval, never seen by
calibration) in 512-token chunks, BOS first, the second half scored; perplexity, KL and
top-1 against the dequantized source. Bytes count every row as its codec stores it plus an
int32 row index per token (what a permuted store would need to find a token's row).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bench_codecs import CTX, Score, _parameters, eval_text, log_softmax
from machine import describe_machine, machine_summary

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SYSTEMS = ["bpal4|bpal3", "bpal4|bpal4@32768/bpal2", "bpal4|bpal4@16384/bpal2",
                   "bpal4|bpal4@32768/bpal3", "bpal3|bpal4@32768/bpal2",
                   "bpal4/bpal3|bpal4@32768/bpal2"]


@dataclass(frozen=True)
class System:
    name: str
    attn: str
    ffn: str
    hot: str
    cold: str
    hot_rows: int  # tokens in the hot codec; the whole vocabulary when one codec

    @classmethod
    def parse(cls, spec: str, vocab: int) -> System:
        linear, _, embed = spec.partition("|")
        if not embed:
            raise SystemExit(f"{spec!r}: expected LINEAR|EMBED")
        attn, _, ffn = linear.partition("/")
        hot, _, rest = embed.partition("@")
        if not rest:
            return cls(spec, attn, ffn or attn, hot, hot, vocab)
        count, _, cold = rest.partition("/")
        if not cold or not count.isdigit() or not 0 < int(count) <= vocab:
            raise SystemExit(f"{spec!r}: expected HOT@N/COLD with 0 < N <= {vocab}")
        return cls(spec, attn, ffn or attn, hot, cold, int(count))

    def codecs(self) -> set[str]:
        return {self.attn, self.ffn, self.hot, self.cold}


class DecodedStore:
    """A store's matrices decoded to float32: attention by field, FFNs as (gate, up, down)."""

    def __init__(self, path: Path):
        from flashinfer_ondevice.quant.codecs import codec
        from flashinfer_ondevice.schema import LAYER_MATRICES, layer_key
        from flashinfer_ondevice.store.reader import open_store

        store = open_store(path)

        def rows(entry) -> np.ndarray:
            raw = np.fromfile(entry.path, np.uint8, entry.nbytes, offset=entry.offset)
            return raw.reshape(entry.rows, entry.row_nbytes)

        def decode(entry, raw: np.ndarray) -> np.ndarray:
            return codec(entry.codec).decode(np.ascontiguousarray(raw), entry.cols)

        t = store.tensors
        self.nbytes = {"attn": 0, "ffn": 0}
        self.attn, self.ffn = [], []
        for i in range(store.config.n_layers):
            self.attn.append({f: decode(t[layer_key(i, f)], rows(t[layer_key(i, f)]))
                              for f in LAYER_MATRICES})
            self.nbytes["attn"] += sum(t[layer_key(i, f)].nbytes for f in LAYER_MATRICES)
            ffn = t[layer_key(i, "ffn")]
            raw, width = rows(ffn), codec(ffn.codec).row_nbytes(ffn.cols)
            gate, up, down_t = (decode(ffn, raw[:, k * width:(k + 1) * width])
                                for k in range(3))
            self.ffn.append((gate, up, np.ascontiguousarray(down_t.T)))
            self.nbytes["ffn"] += ffn.nbytes
        self.embed = decode(t["embed"], rows(t["embed"]))
        self.embed_row_nbytes = t["embed"].row_nbytes


def mean_probabilities(config, weights, chunks: list[np.ndarray]) -> np.ndarray:
    """Each token's predicted probability averaged over every position of `chunks`: the
    ranking convert makes from the statistics' final hidden states (build/vocab_tiers.py),
    here from whole forward passes."""
    from flashinfer_ondevice.build import codec_choice

    total, positions = np.zeros(config.vocab_size), 0
    for chunk in chunks:
        logp = codec_choice.log_probs(config, weights, chunk)
        total += np.exp(logp).sum(axis=0)
        positions += len(logp)
    return total / positions


def build(system: System, source, decoded: dict[str, DecodedStore], order: np.ndarray):
    """The source's float32 weights with `system`'s decoded matrices, and their bytes."""
    weights = copy.copy(source)
    weights.layers = []
    for i, layer in enumerate(source.layers):
        layer = copy.copy(layer)
        for field, value in decoded[system.attn].attn[i].items():
            setattr(layer, field, value)
        layer.w_gate, layer.w_up, layer.w_down = decoded[system.ffn].ffn[i]
        weights.layers.append(layer)
    hot = np.zeros(len(order), bool)
    hot[order[:system.hot_rows]] = True
    weights.embed = np.where(hot[:, None], decoded[system.hot].embed, decoded[system.cold].embed)
    nbytes = decoded[system.attn].nbytes["attn"] + decoded[system.ffn].nbytes["ffn"] + \
        system.hot_rows * decoded[system.hot].embed_row_nbytes + \
        (len(order) - system.hot_rows) * decoded[system.cold].embed_row_nbytes
    if system.hot_rows < len(order):
        nbytes += 4 * len(order)  # the row index of each token
    return weights, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-m", "--model", default=None, help="source GGUF (default model)")
    parser.add_argument("--systems", nargs="+", default=DEFAULT_SYSTEMS)
    parser.add_argument("--tokens", type=int, default=20480, help="held-out tokens evaluated")
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "vocab-tiers"))
    args = parser.parse_args()

    from tqdm import tqdm

    from flashinfer_ondevice.api import ensure_store
    from flashinfer_ondevice.build import codec_choice
    from flashinfer_ondevice.build.calibrate import default_text
    from flashinfer_ondevice.build.convert import STATS_TOKENS, calibration_chunks
    from flashinfer_ondevice.default_model import default_model_path
    from flashinfer_ondevice.loader import load_checkpoint

    source_path = Path(args.model) if args.model else default_model_path(progress=True)
    checkpoint = load_checkpoint(source_path)
    config, source, tokenizer = checkpoint.config, checkpoint.weights, checkpoint.tokenizer
    systems = [System.parse(s, config.vocab_size) for s in args.systems]
    codecs = sorted(set().union(*(s.codecs() for s in systems)))
    decoded = {c: DecodedStore(ensure_store(source_path, c, progress=True)) for c in codecs}

    start = time.perf_counter()
    calibration, _ = calibration_chunks(tokenizer, default_text(), STATS_TOKENS)
    probability = mean_probabilities(config, source, calibration)
    order = np.argsort(-probability, kind="stable")
    prior_seconds = time.perf_counter() - start

    ids = tokenizer.encode(eval_text(), add_special=False)[:args.tokens]
    step, first = CTX - 1, CTX // 2
    chunks = [np.array([tokenizer.bos_id] + ids[i:i + step])
              for i in range(0, len(ids) - step + 1, step)]
    held_out = np.array(ids)
    built = {s.name: build(s, source, decoded, order) for s in systems}
    del decoded
    scores = {s.name: Score() for s in systems}
    for chunk in tqdm(chunks, desc="chunks", unit="chunk"):
        targets = chunk[first + 1:]
        ref = log_softmax(codec_choice.log_probs(config, source, chunk)[first:-1]
                          .astype(np.float64))
        for name, (weights, _) in built.items():
            logp = log_softmax(codec_choice.log_probs(config, weights, chunk)[first:-1]
                               .astype(np.float64))
            scores[name].add(logp, ref, targets)
    parameters = _parameters(config)
    rows = []
    for s in systems:
        nbytes = built[s.name][1]
        covered = float(np.isin(held_out, order[:s.hot_rows]).mean())
        rows.append({"system": s.name, "weight_bytes": int(nbytes),
                     "bits_per_weight": nbytes * 8 / parameters,
                     "held_out_tokens_in_hot_rows": covered, **scores[s.name].result()})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    result = {"machine": describe_machine(), "source": source_path.name,
              "parameters": parameters, "chunks": len(chunks), "ctx": CTX,
              "prior": "mean predicted probability over the calibration statistics tokens",
              "prior_seconds": prior_seconds, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"Machine: {machine_summary(result['machine'])}", "",
             f"{source_path.name}; {len(chunks)} chunks of {CTX} held-out tokens, second half "
             "scored; float32 engine on decoded weights; KL and top-1 against the source", "",
             "| system (linear \\| embedding) | weight MB | bits/weight | held-out tokens in "
             "hot rows | perplexity | mean KL | top-1 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: r["weight_bytes"]):
        name = r["system"].replace("|", " \\| ")
        lines.append(f"| {name} | {r['weight_bytes'] / 1e6:.1f} | "
                     f"{r['bits_per_weight']:.2f} | {r['held_out_tokens_in_hot_rows']:.1%} | "
                     f"{r['perplexity']:.3f} | {r['mean_kl']:.3f} | "
                     f"{r['top1_agreement']:.1%} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
