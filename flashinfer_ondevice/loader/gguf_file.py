"""GGUF loader: metadata -> ModelConfig, tensors -> float32 Weights, vocabulary -> tokenizer.

The file is untrusted: `gguf_header` validates the header, and here every tensor's type, shape
and byte range is checked against the config and the file size before it is dequantized.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from tqdm import tqdm

from ..config import ModelConfig, traits_for
from ..errors import ModelFileError, UnsupportedModelError
from ..quant.activations import input_format_for
from ..quant.ggml import SUPPORTED_TYPES, dequantize, stored_nbytes
from ..schema import LAYER_TENSORS, expected_shapes, layer_tensor_name
from ..values import integer, number, printable, text
from ..weights import LayerWeights, Weights
from .checkpoint import Checkpoint
from .gguf_header import GGUFHeader, TensorRecord, read_header
from .gguf_vocab import check_vocabulary_file
from .tokenizer import GGUFTokenizer

_REQUIRED = object()  # read_config: a key without a default


def read_config(header: GGUFHeader) -> ModelConfig:
    """The model's hyperparameters from the GGUF metadata, each checked for type and range
    under its GGUF key (the one place GGUF metadata numbers enter)."""
    meta = header.metadata
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ModelFileError(f"{header.path}: GGUF has no general.architecture")
    traits_for(arch)

    def key(name: str, read, default=_REQUIRED, **limits):
        full = f"{arch}.{name}"
        if full not in meta:
            if default is _REQUIRED:
                raise ModelFileError(f"{header.path}: GGUF lacks {full}")
            return default
        return read(meta[full], full, **limits)

    hidden = key("embedding_length", integer)
    n_heads = key("attention.head_count", integer)
    n_layers = key("block_count", integer)
    if n_layers > len(header.tensors):  # bounds the work the layer count causes
        raise ModelFileError(f"{header.path}: {arch}.block_count={n_layers}, but the file "
                             f"holds only {len(header.tensors)} tensors")
    embed = header.tensors.get("token_embd.weight")
    if embed is None or len(embed.shape) != 2:
        raise ModelFileError(f"{header.path}: GGUF has no 2-D token_embd.weight")
    rope_theta = key("rope.freq_base", number, 10000.0, low=0.0, high=1e12)
    scaling = key("rope.scaling.type", text, None)
    if scaling not in (None, "none", "linear"):
        raise UnsupportedModelError(f"unsupported rope scaling '{printable(scaling)}'")
    rope_scale = key("rope.scaling.factor", number, 1.0, low=0.0, high=1e6) \
        if scaling == "linear" else 1.0
    sliding_window, pattern, rope_theta_local, attn_scale = None, 0, rope_theta, 0.0
    if arch == "gemma3":
        # llama.cpp's gemma3 conventions: every 6th layer is global, local layers use rope
        # base 10k and no scaling, and the 27B (62 layers) scales queries by 1/sqrt(hidden/heads).
        sliding_window = key("attention.sliding_window", integer, None)
        pattern, rope_theta_local = 6, 10000.0
        if n_layers == 62:
            attn_scale = 1.0 / math.sqrt(hidden / n_heads)
    n_kv_heads = key("attention.head_count_kv", integer, n_heads)
    if n_heads % n_kv_heads:
        raise ModelFileError(f"{header.path}: {arch}.attention.head_count={n_heads} is not a "
                             f"multiple of {arch}.attention.head_count_kv={n_kv_heads}")
    head_dim = key("attention.key_length", integer, max(hidden // n_heads, 1))
    if head_dim % 2:
        raise ModelFileError(f"{header.path}: {arch}.attention.key_length={head_dim} must be "
                             "even for rope")
    config = ModelConfig(
        arch=arch,
        vocab_size=int(embed.shape[0]),
        hidden_size=hidden,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        ffn_size=key("feed_forward_length", integer),
        norm_eps=key("attention.layer_norm_rms_epsilon", number, 1e-6, low=0.0, high=1.0),
        context_length=key("context_length", integer, 2048),
        rope_theta=rope_theta,
        rope_theta_local=rope_theta_local,
        rope_scale=rope_scale,
        sliding_window=sliding_window,
        sliding_window_pattern=pattern,
        attn_scale=attn_scale,
        tie_embeddings="output.weight" not in header.tensors,
    )
    config.validate()
    return config


def check_tensor(record: TensorRecord, shape: tuple[int, ...], file_size: int) -> int:
    """Validate a tensor record against its expected shape and the file; return its bytes."""
    name = record.name
    if record.shape != shape:
        raise ModelFileError(f"tensor {name} has shape {record.shape}, the config implies {shape}")
    try:
        qtype = GGMLQuantizationType(record.ggml_type)
    except ValueError:
        raise UnsupportedModelError(f"tensor {name} has unknown type {record.ggml_type}") from None
    if qtype not in SUPPORTED_TYPES:
        raise UnsupportedModelError(f"tensor {name} has type {qtype.name}, which this runtime "
                                    "cannot read (supported: "
                                    f"{', '.join(sorted(t.name for t in SUPPORTED_TYPES))})")
    block_size = GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block_size:
        raise ModelFileError(f"tensor {name}: rows of {shape[-1]} are not whole {qtype.name} "
                             f"blocks of {block_size}")
    n_bytes = stored_nbytes(qtype, math.prod(shape))
    end = record.offset + n_bytes
    if end > file_size:
        raise ModelFileError(
            f"truncated GGUF: tensor {name} ends at byte {end}, the file has {file_size}")
    return n_bytes


def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation for interleaved rope (Llama GGUFs only)."""
    rest = w.shape[1:]
    return (w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *rest)
            .swapaxes(1, 2).reshape(w.shape))


class _LazyLayers(Sequence[LayerWeights]):
    """Transformer blocks dequantized when asked for, one at a time (convert of big models)."""

    def __init__(self, n_layers: int, build):
        self._n_layers = n_layers
        self._build = build

    def __len__(self) -> int:
        return self._n_layers

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n_layers))]
        if not -self._n_layers <= i < self._n_layers:
            raise IndexError(i)
        return self._build(i % self._n_layers)


def inspect_gguf(path: Path) -> tuple[GGUFHeader, ModelConfig, dict, dict[str, int]]:
    """Header, config, expected shapes and byte sizes of every tensor, all checked against
    the file: what load_gguf needs before reading any weight."""
    header = read_header(path)
    config = read_config(header)
    shapes = expected_shapes(config)
    missing = [name for name in shapes if name not in header.tensors]
    if missing:
        raise ModelFileError(f"GGUF is missing tensors: {', '.join(missing[:5])}"
                             + (" ..." if len(missing) > 5 else ""))
    if "rope_freqs.weight" in header.tensors:
        shapes["rope_freqs.weight"] = (config.head_dim // 2,)
    sizes = {name: check_tensor(header.tensors[name], shape, header.file_size)
             for name, shape in shapes.items()}
    template = header.metadata.get("tokenizer.chat_template")
    if template is not None:
        text(template, "tokenizer.chat_template")
    return header, config, shapes, sizes


def check_gguf(path: Path) -> None:
    """Everything about a GGUF that can be checked without reading its weights."""
    inspect_gguf(path)
    check_vocabulary_file(path)


def load_gguf(path: Path, progress: bool = False, lazy: bool = False) -> Checkpoint:
    """Read a GGUF file. `lazy`: blocks are dequantized only when `weights.layers[i]` is read,
    so peak memory is one block plus the embeddings instead of the whole float32 model."""
    header, config, shapes, sizes = inspect_gguf(path)

    def tensor(name: str) -> np.ndarray:
        record = header.tensors[name]
        raw = np.memmap(path, dtype=np.uint8, mode="r", offset=record.offset,
                        shape=(sizes[name],))
        values = dequantize(raw, GGMLQuantizationType(record.ggml_type), shapes[name])
        if not np.isfinite(values).all():
            raise ModelFileError(f"{header.path}: tensor {name} holds NaN or infinite values")
        return values

    def layer(i: int, floats: dict[str, np.ndarray]) -> LayerWeights:
        names = {field: layer_tensor_name(i, suffix) for suffix, field in LAYER_TENSORS.items()
                 if layer_tensor_name(i, suffix) in shapes}
        fields = {field: floats.pop(name) if name in floats else tensor(name)
                  for field, name in names.items()}
        fields["input_formats"] = {
            field: fmt for field, name in names.items() if not name.endswith(".bias")
            and (fmt := input_format_for(GGMLQuantizationType(header.tensors[name].ggml_type)))}
        if config.arch == "llama":
            fields["wq"] = _unpermute_rope(fields["wq"], config.n_heads)
            fields["wk"] = _unpermute_rope(fields["wk"], config.n_kv_heads)
        return LayerWeights(**fields)

    floats: dict[str, np.ndarray] = {}
    eager = [name for name in shapes if not lazy or not name.startswith("blk.")]
    with tqdm(total=sum(sizes[name] for name in eager), unit="B", unit_scale=True,
              desc="loading", disable=not progress, leave=False) as bar:
        for name in eager:
            floats[name] = tensor(name)
            bar.update(sizes[name])

    layers: Sequence[LayerWeights] = (
        _LazyLayers(config.n_layers, lambda i: layer(i, {})) if lazy
        else [layer(i, floats) for i in range(config.n_layers)])
    weights = Weights(
        embed=floats.pop("token_embd.weight"),
        layers=layers,
        final_norm=floats.pop("output_norm.weight"),
        output=floats.pop("output.weight", None),
        rope_freq_factors=floats.pop("rope_freqs.weight", None),
        lm_head_format=input_format_for(GGMLQuantizationType(
            header.tensors["token_embd.weight" if config.tie_embeddings
                           else "output.weight"].ggml_type)),
    )
    tokenizer = GGUFTokenizer(path)
    if tokenizer.vocab_size != config.vocab_size:
        raise ModelFileError(f"vocabulary has {tokenizer.vocab_size} tokens, the embedding "
                             f"{config.vocab_size}")
    template = header.metadata.get("tokenizer.chat_template")
    return Checkpoint(config, weights, tokenizer, template, path, ggml_numerics=True)
