"""How well a low-rank proxy of the output layer picks the next token (exploration).

    python tools/probe_head_proxy.py [--store STORE] [--ranks 64 128 192] [--k 64 256 1024]

The output layer is 62% of Gemma 3 270M's bytes. A shortlist plan would keep a rank-r proxy
resident, score every token with it, and read exact rows only for the top-k candidates. This
measures, on held-out text (final hidden states from the dense model), whether the exact top-1
is among the candidates, top-1 agreement and KL(exact || proxy logits with exact candidates)
for a plain SVD proxy and one fitted in the metric of calibration hidden states.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None)
    parser.add_argument("--ranks", type=int, nargs="+", default=[64, 128, 192])
    parser.add_argument("--k", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()

    import flashinfer_ondevice as fi
    from flashinfer_ondevice.api import ensure_store
    from flashinfer_ondevice.build.calibrate import default_text
    from flashinfer_ondevice.default_model import default_model_path

    model = fi.load(args.store or ensure_store(default_model_path()), selector="dense",
                    quality="exact")  # codec bytes, not a prepared form
    if model.weights.head_rows.vocab_tiers is not None:
        raise SystemExit("the proxy is fitted to one output-layer tensor: use a store "
                         "without vocabulary tiers")
    head = model.weights.lm_head
    exact_rows = model.weights.lm_head_rows
    table = exact_rows.codec.decode(exact_rows.raw, exact_rows.cols)  # (vocab, hidden)
    captured: list[np.ndarray] = []

    class Capture:
        def apply(self, x):
            captured.append(x.copy())
            return head.apply(x)

    model.weights.lm_head = Capture()

    def hidden_states(text: str) -> tuple[np.ndarray, np.ndarray]:
        """Final hidden states of every position but each chunk's last, and the next ids."""
        ids = model.tokenize(text, add_special=False)[:args.tokens]
        bos, targets = [model.tokenizer.bos_id], []
        for s in range(0, len(ids), 255):
            chunk = bos + ids[s:s + 255]
            model.engine.forward(np.array(chunk), model.engine.new_cache(len(chunk)),
                                 all_logits=True)
            captured[-1] = captured[-1][:-1]
            targets += chunk[1:]
        out = np.concatenate(captured)
        captured.clear()
        return out, np.array(targets)

    train, _ = hidden_states(default_text())
    test, targets = hidden_states((ROOT / "data/eval/apache-2.0.txt").read_text())
    cov = train.T @ train / len(train)
    w, q = np.linalg.eigh(cov)
    w = np.maximum(w, w.max() * 1e-8)
    half, inv_half = (q * np.sqrt(w)) @ q.T, (q / np.sqrt(w)) @ q.T
    exact = test @ table.T
    lp, top1 = log_softmax(exact), exact.argmax(1)
    rows = np.arange(len(test))[:, None]
    nll = -lp[rows[:, 0], targets].mean()
    print(f"exact: perplexity {np.exp(nll):.3f} over {len(test)} tokens\n")
    print("| proxy | rank | k | top-1 in candidates | top-1 agreement | KL | perplexity |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in args.ranks:
        for kind in ("plain SVD", "calibrated"):
            m = table if kind == "plain SVD" else table @ half
            v = np.linalg.eigh(m.T @ m)[1][:, ::-1][:, :r]
            a, b = m @ v, v.T if kind == "plain SVD" else v.T @ inv_half
            proxy = (test @ b.T) @ a.T
            for k in args.k:
                cand = np.argpartition(-proxy, k, axis=1)[:, :k]
                hit = np.mean([t in set(c) for t, c in zip(top1, cand, strict=True)])
                mixed = proxy.copy()
                mixed[rows, cand] = exact[rows, cand]
                lm = log_softmax(mixed)
                kl = np.mean(np.sum(np.exp(lp) * (lp - lm), 1))
                agree = np.mean(mixed.argmax(1) == top1)
                ppl = np.exp(-lm[rows[:, 0], targets].mean())
                print(f"| {kind} | {r} | {k} | {hit:.3f} | {agree:.3f} | {kl:.4f} | "
                      f"{ppl:.3f} ({(ppl / np.exp(nll) - 1) * 100:+.1f}%) |")


if __name__ == "__main__":
    main()
