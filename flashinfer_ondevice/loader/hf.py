"""Hugging Face folder loader: config.json + *.safetensors (+ index) + tokenizer.json.

Maps HF names and conventions onto `Weights` (Gemma's norms store `w` and are used as `1 + w`,
so 1 is added here). Shard names from the index must be plain file names inside the folder.
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from ..config import ModelConfig
from ..errors import ModelFileError, UnsupportedModelError
from ..values import describe, flag, integer, number
from ..weights import LayerWeights, Weights
from .checkpoint import Checkpoint
from .safetensors_file import SafetensorsFile
from .tokenizer import HFTokenizer, read_json

_REQUIRED = object()  # _config_from_hf: a field without a default

_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2",
                "gemma3_text": "gemma3", "gemma3": "gemma3"}

# HF suffix under model.layers.N. -> LayerWeights field, per family
_COMMON = {
    "input_layernorm.weight": "attn_norm", "self_attn.q_proj.weight": "wq",
    "self_attn.k_proj.weight": "wk", "self_attn.v_proj.weight": "wv",
    "self_attn.o_proj.weight": "wo", "mlp.gate_proj.weight": "w_gate",
    "mlp.up_proj.weight": "w_up", "mlp.down_proj.weight": "w_down",
    "self_attn.q_proj.bias": "bq", "self_attn.k_proj.bias": "bk", "self_attn.v_proj.bias": "bv",
}
_LLAMA_NORMS = {"post_attention_layernorm.weight": "ffn_norm"}
_GEMMA_NORMS = {
    "post_attention_layernorm.weight": "post_attn_norm",
    "pre_feedforward_layernorm.weight": "ffn_norm",
    "post_feedforward_layernorm.weight": "post_ffn_norm",
    "self_attn.q_norm.weight": "q_norm", "self_attn.k_norm.weight": "k_norm",
}
_PREFIXES = ("language_model.model.", "model.language_model.", "model.")


def _config_from_hf(raw: dict) -> ModelConfig:
    """The model's hyperparameters from config.json, each checked for type and range under
    its JSON key (the one place config.json numbers enter)."""
    model_type = raw.get("model_type")
    if model_type == "gemma3" and isinstance(raw.get("text_config"), dict):
        raw = {**raw["text_config"], "model_type": "gemma3_text"}
    arch = _MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None
    if arch is None:
        raise UnsupportedModelError(f"unsupported model_type {describe(model_type)} "
                                    f"(supported: {', '.join(sorted(_MODEL_TYPES))})")

    def field(name: str, read, default=_REQUIRED, **limits):
        value = raw.get(name)
        if value is None:  # HF writes null for "the default"
            if default is _REQUIRED:
                raise ModelFileError(f"config.json lacks {name}")
            return default
        return read(value, f"config.json {name}", **limits)

    hidden = field("hidden_size", integer)
    n_heads = field("num_attention_heads", integer)
    scaling = raw.get("rope_scaling") or {}
    if not isinstance(scaling, dict):
        raise ModelFileError(f"config.json rope_scaling must be an object, got "
                             f"{describe(scaling)}")
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type not in (None, "default", "linear"):
        raise UnsupportedModelError(f"unsupported rope scaling {describe(rope_type)}")
    rope_scale = number(scaling.get("factor"), "config.json rope_scaling factor", 0.0, 1e6) \
        if rope_type == "linear" else 1.0
    gemma = arch == "gemma3"
    head_dim = field("head_dim", integer, max(hidden // n_heads, 1))
    rope_theta = field("rope_theta", number, 10000.0, low=0.0, high=1e12)
    attn_scale = 0.0
    if gemma:
        scalar = field("query_pre_attn_scalar", number, float(head_dim), low=0.0, high=1e9)
        attn_scale = scalar ** -0.5 if scalar != head_dim else 0.0
    config = ModelConfig(
        arch=arch,
        vocab_size=field("vocab_size", integer),
        hidden_size=hidden,
        n_layers=field("num_hidden_layers", integer),
        n_heads=n_heads,
        n_kv_heads=field("num_key_value_heads", integer, n_heads),
        head_dim=head_dim,
        ffn_size=field("intermediate_size", integer),
        norm_eps=field("rms_norm_eps", number, 1e-6, low=0.0, high=1.0),
        context_length=field("max_position_embeddings", integer, 2048),
        rope_theta=rope_theta,
        rope_theta_local=field("rope_local_base_freq", number, 10000.0, low=0.0, high=1e12)
        if gemma else rope_theta,
        rope_scale=rope_scale,
        sliding_window=field("sliding_window", integer, None) if gemma else None,
        sliding_window_pattern=field("sliding_window_pattern", integer, 6) if gemma else 0,
        attn_scale=attn_scale,
        tie_embeddings=field("tie_word_embeddings", flag, gemma),
    )
    if config.n_heads % config.n_kv_heads:
        raise ModelFileError(f"config.json num_attention_heads={n_heads} is not a multiple of "
                             f"num_key_value_heads={config.n_kv_heads}")
    if head_dim % 2:
        raise ModelFileError(f"config.json head_dim={head_dim} must be even for rope")
    config.validate()
    return config


def _shard_files(folder: Path) -> list[Path]:
    index = read_json(folder / "model.safetensors.index.json")
    if index is None:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ModelFileError(f"{folder}: no *.safetensors files")
        return files
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise ModelFileError(f"{folder}: model.safetensors.index.json has no weight_map object")
    names = set()
    for name in weight_map.values():
        if not isinstance(name, str):
            raise ModelFileError(f"{folder}: index names a shard outside the folder: "
                                 f"{describe(name)}")
        names.add(name)
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
            raise ModelFileError(f"{folder}: index names a shard outside the folder: {name!r}")
    return [folder / name for name in sorted(names)]


def hf_config(folder: Path) -> ModelConfig:
    """The model config of a Hugging Face folder (its config.json)."""
    return _config_from_hf(_config_json(folder))


def _config_json(folder: Path) -> dict:
    raw = read_json(folder / "config.json")
    if raw is None:
        raise ModelFileError(f"{folder} is neither a Hugging Face model folder (no config.json "
                             "file) nor a flash store (no manifest.json file)")
    return raw


def check_hf_folder(folder: Path) -> None:
    """Everything about a Hugging Face folder that can be checked without reading weights:
    the config, every shard's header, and that a tokenizer is there."""
    config = _config_from_hf(_config_json(folder))
    n_tensors = 0
    for shard in _shard_files(folder):
        if not shard.is_file():
            raise ModelFileError(f"missing shard {shard}")
        n_tensors += len(SafetensorsFile(shard).entries)
    if config.n_layers > n_tensors:  # bounds the work the layer count causes
        raise ModelFileError(f"config.json num_hidden_layers={config.n_layers}, but the "
                             f"folder holds only {n_tensors} tensors")
    if not (folder / "tokenizer.json").is_file():
        raise ModelFileError(f"{folder}: no tokenizer.json")


def load_hf_folder(folder: Path, progress: bool = False) -> Checkpoint:
    raw = _config_json(folder)
    config = _config_from_hf(raw)
    tensors: dict[str, tuple[SafetensorsFile, str]] = {}  # short name -> (file, full name)
    for shard in _shard_files(folder):
        if not shard.is_file():
            raise ModelFileError(f"missing shard {shard}")
        st = SafetensorsFile(shard)
        for name in st.entries:
            short = next((name[len(p):] for p in _PREFIXES if name.startswith(p)), name)
            tensors[short] = (st, name)

    gemma = config.arch == "gemma3"
    layer_names = {**_COMMON, **(_GEMMA_NORMS if gemma else _LLAMA_NORMS)}
    norm_fields = {"attn_norm", "ffn_norm", "post_attn_norm", "post_ffn_norm",
                   "q_norm", "k_norm"}
    bar = tqdm(total=config.n_layers + 1, desc="loading", disable=not progress, leave=False)

    shapes = _expected_hf_shapes(config, layer_names)

    def read(name: str):
        if name not in tensors:
            raise ModelFileError(f"{folder}: missing tensor {name}")
        st, full_name = tensors[name]
        declared = st.entries[full_name][1]
        if name in shapes and declared != shapes[name]:  # checked before reading its bytes
            raise ModelFileError(f"tensor {name} has shape {declared}, the config implies "
                                 f"{shapes[name]}")
        return st.read(full_name)

    layers = []
    for i in range(config.n_layers):
        fields = {}
        for suffix, field in layer_names.items():
            name = f"layers.{i}.{suffix}"
            if name in tensors:
                value = read(name)
                fields[field] = value + 1.0 if gemma and field in norm_fields else value
        try:
            layers.append(LayerWeights(**fields))
        except TypeError:
            raise ModelFileError(f"{folder}: layer {i} lacks attention or FFN tensors") from None
        bar.update(1)
    final_norm = read("norm.weight")
    output = None
    if not config.tie_embeddings:
        output = read("lm_head.weight")
    weights = Weights(embed=read("embed_tokens.weight"), layers=layers,
                      final_norm=final_norm + 1.0 if gemma else final_norm, output=output)
    bar.close()
    _check_shapes(config, weights)
    tokenizer = HFTokenizer(folder, raw)
    return Checkpoint(config, weights, tokenizer, tokenizer.chat_template, folder)


def _expected_hf_shapes(config: ModelConfig, layer_names: dict[str, str]
                        ) -> dict[str, tuple[int, ...]]:
    """The shape the config implies for each HF tensor name (prefix stripped)."""
    from ..schema import LAYER_TENSORS, expected_shapes, layer_tensor_name

    gguf_shapes = expected_shapes(config)
    suffix_of = {field: suffix for suffix, field in LAYER_TENSORS.items()}
    shapes = {"embed_tokens.weight": gguf_shapes["token_embd.weight"],
              "lm_head.weight": gguf_shapes.get("output.weight", gguf_shapes["token_embd.weight"]),
              "norm.weight": gguf_shapes["output_norm.weight"]}
    for i in range(config.n_layers):
        for hf_suffix, field in layer_names.items():
            name = layer_tensor_name(i, suffix_of[field])
            if name in gguf_shapes:
                shapes[f"layers.{i}.{hf_suffix}"] = gguf_shapes[name]
    return shapes


def _check_shapes(config: ModelConfig, weights: Weights) -> None:
    from ..schema import LAYER_TENSORS, expected_shapes, layer_tensor_name

    shapes = expected_shapes(config)
    checks = [("embed_tokens", weights.embed, shapes["token_embd.weight"])]
    if weights.output is not None:
        checks.append(("lm_head", weights.output, shapes["output.weight"]))
    for i, layer in enumerate(weights.layers):
        for suffix, field in LAYER_TENSORS.items():
            name = layer_tensor_name(i, suffix)
            if name in shapes:
                checks.append((f"layer {i} {field}", getattr(layer, field), shapes[name]))
    for what, array, shape in checks:
        if array is None or array.shape != shape:
            got = None if array is None else array.shape
            raise ModelFileError(f"tensor {what} has shape {got}, the config implies {shape}")

