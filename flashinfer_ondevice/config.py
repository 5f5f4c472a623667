"""ModelConfig: the hyperparameters of one model, and the one table of architecture differences.

Every difference between supported architectures (norm placement, activation, biases, rope
bases, sliding windows, embedding scale) is a field here; the forward pass in `model.py` reads
these fields and never branches on the architecture's name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ModelFileError, UnsupportedModelError
from .values import flag, integer, number, printable, text


@dataclass(frozen=True)
class ArchTraits:
    """What an architecture does, independent of its size."""

    activation: str  # "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    qk_norm: bool  # RMSNorm on each head of q and k before rope (Gemma 3)
    post_norms: bool  # RMSNorm on the attention and FFN outputs before the residual (Gemma 3)
    qkv_bias: bool  # q/k/v projections carry biases (Qwen2)
    scale_embeddings: bool  # multiply input embeddings by sqrt(hidden_size) (Gemma)


ARCHITECTURES: dict[str, ArchTraits] = {
    "llama": ArchTraits("silu", qk_norm=False, post_norms=False, qkv_bias=False,
                        scale_embeddings=False),
    "qwen2": ArchTraits("silu", qk_norm=False, post_norms=False, qkv_bias=True,
                        scale_embeddings=False),
    "gemma3": ArchTraits("gelu_tanh", qk_norm=True, post_norms=True, qkv_bias=False,
                         scale_embeddings=True),
}


def traits_for(arch: str) -> ArchTraits:
    """The traits of `arch`, or a clear error naming the architectures that are supported."""
    if arch not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedModelError(
            f"unsupported architecture '{printable(str(arch))}' (supported: {supported})")
    return ARCHITECTURES[arch]


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of one transformer, in the terms the forward pass uses."""

    arch: str
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_size: int
    norm_eps: float
    context_length: int
    rope_theta: float  # rope base of global (full-attention) layers
    rope_theta_local: float  # rope base of sliding-window layers (== rope_theta if none)
    rope_scale: float = 1.0  # linear position scaling of global layers (positions / rope_scale)
    sliding_window: int | None = None  # window of local layers, in tokens (key within window)
    sliding_window_pattern: int = 0  # every n-th layer is global; 0 = no local layers
    attn_scale: float = 0.0  # softmax scale; 0 means 1/sqrt(head_dim)
    tie_embeddings: bool = True

    @property
    def traits(self) -> ArchTraits:
        return traits_for(self.arch)

    @property
    def softmax_scale(self) -> float:
        return self.attn_scale or 1.0 / math.sqrt(self.head_dim)

    def is_local_layer(self, layer: int) -> bool:
        """True for sliding-window layers: all but every `sliding_window_pattern`-th layer."""
        if not self.sliding_window or not self.sliding_window_pattern:
            return False
        return (layer + 1) % self.sliding_window_pattern != 0

    def validate(self) -> None:
        """Reject values that cannot describe a working model (hostile or corrupt metadata):
        every field's type, finiteness and range, and how the fields fit together."""
        text(self.arch, "arch")
        traits_for(self.arch)
        for name in ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads",
                     "head_dim", "ffn_size", "context_length"):
            integer(getattr(self, name), name)
        integer(self.sliding_window_pattern, "sliding_window_pattern", 0)
        if self.sliding_window is not None:
            integer(self.sliding_window, "sliding_window")
        number(self.norm_eps, "norm_eps", 0.0, 1.0)
        for name in ("rope_theta", "rope_theta_local"):
            number(getattr(self, name), name, 0.0, 1e12)
        number(self.rope_scale, "rope_scale", 0.0, 1e6)
        number(self.attn_scale, "attn_scale", 0.0, 1e6, low_open=False)
        flag(self.tie_embeddings, "tie_embeddings")
        if self.n_heads % self.n_kv_heads:
            raise ModelFileError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ModelFileError(f"head_dim={self.head_dim} must be even for rope")
