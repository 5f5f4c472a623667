"""Fit bpal3's levels to a model's weights: where quant/codecs.py's BPal3 table comes from.

    python tools/fit_bpal3_levels.py [-m MODEL.gguf] [--rounds 25]

bpal3's 8 levels have the form low[code & 3] + step * (code >> 2) (its kernels need that
sum: quant/block_palette_kernels.py). Starting from that form's best fit to a Gaussian, each
round gives every weight its nearest level at its block's searched scale (the encoder's step
1, quant/block_palette_fit.py, without calibration statistics), then the 5 values by least
squares over all weights; the levels are rescaled to largest magnitude 1. The rows are
sampled from the embedding and the attention q/output and FFN gate/up/down matrices of
layers 3, 9 and 15 (sample_rows); the first half (the embedding's, layer 3's and 128 of
layer 9's) is fitted, the second scored: relative squared error, against the Gaussian
Lloyd-Max levels (codec revision 2) and the current table. Prints the fitted values to
paste into BPal3.
"""

from __future__ import annotations

import argparse

import gguf
import numpy as np

from flashinfer_ondevice.default_model import default_model_path
from flashinfer_ondevice.quant import block_palette_fit
from flashinfer_ondevice.quant.codecs import BPal3

LAYERS = (3, 9, 15)
MATRICES = ("attn_q.weight", "attn_output.weight", "ffn_gate.weight", "ffn_up.weight",
            "ffn_down.weight")
WIDTH = 640  # weights of a row that are fitted (Gemma 3 270M's hidden size)
LLOYD_MAX = np.array([-2.152, -1.344, -0.756, -0.2451, 0.2451, 0.756, 1.344, 2.152])


def sample_rows(path: str, rng: np.random.Generator) -> np.ndarray:
    """Rows in the file's tensor order: 4,096 of the embedding, up to 1,024 of each of
    MATRICES in layers 3, 9 and 15 (the first WIDTH weights of each)."""
    reader = gguf.GGUFReader(path)
    names = {f"blk.{i}.{m}" for i in LAYERS for m in MATRICES} | {"token_embd.weight"}
    picked = []
    for tensor in reader.tensors:
        if tensor.name in names:
            cols = int(tensor.shape[0])
            w = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(-1, cols)
            count = min(len(w), 4096 if tensor.name == "token_embd.weight" else 1024)
            picked.append(w[rng.choice(len(w), count, replace=False), :WIDTH])
    return np.concatenate(picked).astype(np.float64)


def encode(rows: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scales, indices into the ascending grid) as the encoder's step 1 chooses them
    (block_palette_fit.search, but at the scales before their float16 rounding, which is
    how the shipped levels were fitted)."""
    scales = np.zeros((len(rows), WIDTH // block_palette_fit.BLOCK))
    block_palette_fit._search_scales(rows, np.ones(WIDTH), grid, block_palette_fit.BLOCK, scales)
    indices = np.zeros(rows.shape, np.uint8)
    block_palette_fit._assign_nearest(rows, grid, block_palette_fit.BLOCK, scales, indices)
    return scales, indices


def relative_error(rows: np.ndarray, grid: np.ndarray) -> float:
    approx = block_palette_fit.decode(*encode(rows, grid), grid)
    return float(((rows - approx) ** 2).sum() / (rows ** 2).sum())


def levels_of(low: np.ndarray, step: float) -> np.ndarray:
    return np.concatenate([low, low + step])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-m", "--model", default=None, help="GGUF (default: embedded model)")
    parser.add_argument("--rounds", type=int, default=25)
    args = parser.parse_args()
    path = args.model or str(default_model_path(progress=True))
    rows = sample_rows(path, np.random.default_rng(0))
    train, test = rows[:len(rows) // 2], rows[len(rows) // 2:]
    low, step = np.array([-2.1895, -0.6925, -0.2115, 1.2855]) / 2.1895, 0.904 / 2.1895
    for r in range(args.rounds):
        levels = levels_of(low, step)
        order = np.argsort(levels)  # the code of each ascending grid value
        scales, indices = encode(train, levels[order])
        codes = order[indices].ravel()
        scale = np.repeat(scales, block_palette_fit.BLOCK, axis=1).ravel()
        design = np.zeros((len(codes), 5))
        design[np.arange(len(codes)), codes & 3] = scale
        design[:, 4] = scale * (codes >> 2)
        solution = np.linalg.lstsq(design, train.ravel(), rcond=None)[0]
        peak = np.abs(levels_of(solution[:4], solution[4])).max()
        low, step = solution[:4] / peak, solution[4] / peak
        print(f"round {r + 1}: low {np.round(low, 4)}, step {step:.4f}", flush=True)
    fitted = np.sort(levels_of(low, step))
    print(f"relative squared error on the held-out rows: fitted {relative_error(test, fitted):.4f}"
          f", Lloyd-Max {relative_error(test, LLOYD_MAX / LLOYD_MAX.max()):.4f}, "
          f"current BPal3 {relative_error(test, BPal3.grid.astype(np.float64)):.4f}")
    print(f"low, step = np.array({np.round(low, 4).tolist()}), {step:.4f}")


if __name__ == "__main__":
    main()
