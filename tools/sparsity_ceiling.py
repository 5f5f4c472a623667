"""How much FFN activation sparsity a model takes at the quality bar, whatever the selector.

    python tools/sparsity_ceiling.py [--store STORE] [-f data/eval/apache-2.0.txt]
        [--tokens 1200] [--sparsities 0.1,0.2,0.25,0.3,0.5] [--out bench-results/sparsity-ceiling]

Each rule picks, per token and layer, which FFN neurons count (the others are zeroed); the
model is scored on held-out text against the dense model (top-1 agreement, perplexity,
KL), teacher-forced in 512-token chunks, fully resident. Thresholds and predictors are fitted
on the packaged calibration text only. Rules, from cheapest to read to most informed:

  gate        |act(g)| above the layer's calibrated threshold (CATS; the gate-first selector)
  gate-topk   the (1 - s) x ffn neurons of largest |act(g)|, per token
  lowrank-R   top-k of |act(g~) * u~| * |d|, g~ and u~ from rank-R least-squares predictors
              of the gate and up projections (what a predicted selector can know)
  int3        top-k of the same score from 3-bit copies of the gate and up rows
  oracle      top-k of the exact |act(g) * u| * |d| (the best any selector can do; it needs
              every neuron's gate and up rows, so it saves reads of down rows only)

g = gate . x, u = up . x, |d| = norm of the neuron's down column. Writes OUT.md and OUT.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 512
CALIBRATION_TOKENS = 2048
TOP1_BAR, PPL_BAR = 0.97, 0.03


def quantized(w: np.ndarray, bits: int) -> np.ndarray:
    """Round-to-nearest symmetric `bits`-bit copy of w with one scale per row."""
    q = 2 ** (bits - 1) - 1
    scale = np.abs(w).max(axis=1, keepdims=True) / q
    return np.clip(np.round(w / scale), -q, q) * scale


class RuleFFN:
    """Stands in for one layer's FFN: dense float32 weights, a neuron-selection rule."""

    def __init__(self, gate: np.ndarray, up: np.ndarray, down: np.ndarray, activation_fn):
        self.gate, self.up, self.down, self.act = gate, up, down, activation_fn
        self.down_norm = np.linalg.norm(down, axis=1)
        self.rule: tuple | None = None  # (kind, data, keep): None runs dense
        self.recorded: list[np.ndarray] | None = None

    def scores(self, kind: str, data, x: np.ndarray) -> np.ndarray:
        if kind in ("gate", "gate-topk"):
            return np.abs(self.act(x @ self.gate.T))
        if kind == "oracle":
            g, u = x @ self.gate.T, x @ self.up.T
        elif kind.startswith("lowrank"):
            (ga, gb), (ua, ub) = data
            g, u = (x @ ga) @ gb, (x @ ua) @ ub
        else:  # quantized copies
            g, u = x @ data[0].T, x @ data[1].T
        return np.abs(self.act(g) * u) * self.down_norm

    def apply(self, x: np.ndarray, activation: str, activation_fn) -> np.ndarray:
        if self.recorded is not None:
            self.recorded.append(x.copy())
        h = self.act(x @ self.gate.T) * (x @ self.up.T)
        if self.rule is not None:
            kind, data, keep = self.rule
            s = self.scores(kind, data, x)
            if kind == "gate":
                h = h * (s > data)
            else:
                cut = -np.partition(-s, keep - 1, axis=1)[:, keep - 1:keep]
                h = h * (s >= cut)
        return h @ self.down


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None, help="flash store [default model's]")
    parser.add_argument("-f", "--file", default=str(ROOT / "data/eval/apache-2.0.txt"))
    parser.add_argument("--tokens", type=int, default=1200)
    parser.add_argument("--sparsities", default="0.1,0.2,0.25,0.3,0.5")
    parser.add_argument("--rules", default="gate,gate-topk,lowrank-128,lowrank-256,int3,oracle")
    parser.add_argument("--out", default=str(ROOT / "bench-results/sparsity-ceiling"))
    args = parser.parse_args()

    import flashinfer_ondevice as fi
    from flashinfer_ondevice.api import ensure_store
    from flashinfer_ondevice.build.calibrate import (
        default_text,
        fit_low_rank,
        next_token_log_probs,
    )
    from flashinfer_ondevice.default_model import default_model_path
    from flashinfer_ondevice.functional import ACTIVATIONS

    store = args.store or str(ensure_store(default_model_path()))
    model = fi.load(store, selector="dense", ctx_size=CHUNK, threads=2, quality="exact")
    config = model.config
    activation_fn = ACTIVATIONS[config.traits.activation]
    ffns = []
    for i in range(config.n_layers):
        bundles = model.weights.resident_ffn(i)
        rb, h = bundles.row_nbytes, bundles.hidden
        parts = [bundles.codec.decode(bundles.raw[:, k * rb:(k + 1) * rb], h) for k in range(3)]
        ffns.append(RuleFFN(*parts, activation_fn))
        model.weights.ffns[i] = ffns[-1]
    bos = [model.tokenizer.bos_id] if model.tokenizer.bos_id is not None else []

    def chunks(text: str, n: int) -> list[list[int]]:
        ids = model.tokenize(text, add_special=False)[:n]
        step = CHUNK - len(bos)
        return [bos + ids[i:i + step] for i in range(0, len(ids), step)]

    def log_probs(chunk_list: list[list[int]]) -> list[np.ndarray]:
        return next_token_log_probs(model, chunk_list, len(bos))

    for f in ffns:
        f.recorded = []
    log_probs(chunks(default_text(), CALIBRATION_TOKENS))
    calibration = [np.concatenate(f.recorded) for f in ffns]
    for f in ffns:
        f.recorded = None
    evaluation = chunks(Path(args.file).read_text(encoding="utf-8"), args.tokens)
    targets = [np.asarray(c[len(bos) + 1:]) for c in evaluation]
    reference = log_probs(evaluation)

    def score(candidate: list[np.ndarray]) -> dict:
        n = sum(len(t) for t in targets)
        nll = ref_nll = agree = kl = 0.0
        for lp, ref, t in zip(candidate, reference, targets, strict=True):
            rows = np.arange(len(t))
            nll -= lp[rows, t].sum()
            ref_nll -= ref[rows, t].sum()
            agree += (lp.argmax(1) == ref.argmax(1)).sum()
            kl += (np.exp(ref) * (ref - lp)).sum()
        return {"tokens": n, "perplexity": float(np.exp(nll / n)),
                "dense_perplexity": float(np.exp(ref_nll / n)),
                "top1_agreement": float(agree / n), "mean_kl": float(kl / n)}

    def rule_data(kind: str, i: int):
        f, x = ffns[i], calibration[i]
        if kind.startswith("lowrank"):
            rank = int(kind.split("-")[1])
            return (tuple(m.astype(np.float32) for m in fit_low_rank(x, x @ f.gate.T, rank)),
                    tuple(m.astype(np.float32) for m in fit_low_rank(x, x @ f.up.T, rank)))
        if kind == "int3":
            return quantized(f.gate, 3), quantized(f.up, 3)
        return None

    rows = []
    for kind in args.rules.split(","):
        data = [rule_data(kind, i) for i in range(config.n_layers)]
        for sparsity in (float(s) for s in args.sparsities.split(",")):
            keep = int(round((1 - sparsity) * config.ffn_size))
            for i, f in enumerate(ffns):
                layer_data = data[i]
                if kind == "gate":  # the layer's calibrated |act(g)| quantile
                    layer_data = float(np.quantile(f.scores("gate", None, calibration[i]),
                                                   sparsity))
                f.rule = (kind, layer_data, keep)
            row = {"rule": kind, "sparsity": sparsity, **score(log_probs(evaluation))}
            row["meets_bar"] = bool(row["top1_agreement"] >= TOP1_BAR and
                                    row["perplexity"] <= row["dense_perplexity"] * (1 + PPL_BAR))
            rows.append(row)
            print(json.dumps(row), flush=True)
    for f in ffns:
        f.rule = None

    result = {"store": store, "text": args.file, "date": time.strftime("%Y-%m-%d"),
              "calibration_tokens": CALIBRATION_TOKENS, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"FFN sparsity rules on {Path(args.file).name} ({rows[0]['tokens']} tokens, "
             f"dense perplexity {rows[0]['dense_perplexity']:.3f}); bar: top-1 >= "
             f"{TOP1_BAR:.0%}, perplexity <= +{PPL_BAR:.0%}", "",
             "| rule | sparsity | top-1 agreement | perplexity | change | mean KL | bar |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        change = (r["perplexity"] / r["dense_perplexity"] - 1) * 100
        lines.append(f"| {r['rule']} | {r['sparsity']:.0%} | {r['top1_agreement']:.1%} | "
                     f"{r['perplexity']:.3f} | {change:+.1f}% | {r['mean_kl']:.4f} | "
                     f"{'met' if r['meets_bar'] else '-'} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
