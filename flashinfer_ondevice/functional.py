"""The numpy math the forward pass and the codecs' reference kernels share: norms,
activations, softmax (and the log-softmax quality scores use) and rope, plus the fp16
roundings of llama.cpp's CPU backend that the reference engine reproduces for GGUF models
(see model.py)."""

from __future__ import annotations

import math

import numpy as np

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    inv_rms = 1.0 / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + eps)
    return (x * inv_rms) * weight


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))


def to_f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def gelu_tanh_f16_table(x: np.ndarray) -> np.ndarray:
    """ggml's GELU_FP16: input and output rounded to fp16; identity above 10, zero below -10."""
    y = to_f16(gelu_tanh(to_f16(x)))
    return np.where(x >= 10.0, x, np.where(x <= -10.0, np.float32(0.0), y))


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


ACTIVATIONS = {"gelu_tanh": gelu_tanh, "silu": silu}
GGML_ACTIVATIONS = {"gelu_tanh": gelu_tanh_f16_table, "silu": silu}


def softmax(scores: np.ndarray) -> np.ndarray:
    scores = scores - scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities along the last axis, in float64 (what quality scores compare)."""
    logits = logits.astype(np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))


def rope_inverse_frequencies(head_dim: int, theta: float,
                             freq_factors: np.ndarray | None = None) -> np.ndarray:
    inv = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    return inv if freq_factors is None else inv / freq_factors.astype(np.float64)


def apply_rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """Rotate-half rope on x of shape (tokens, heads, head_dim)."""
    angles = positions[:, None].astype(np.float64) * inv_freq[None, :]
    cos = np.cos(angles).astype(np.float32)[:, None, :]
    sin = np.sin(angles).astype(np.float32)[:, None, :]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
