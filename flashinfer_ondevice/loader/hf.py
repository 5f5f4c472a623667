"""Hugging Face folder loader: config.json + *.safetensors (+ index) + tokenizer.json.

Maps HF names and conventions onto `Weights` (Gemma's norms store `w` and are used as `1 + w`,
so 1 is added here). Shard names from the index must be plain file names inside the folder.
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from ..config import ModelConfig
from ..errors import ModelFileError, UnsupportedModelError
from ..weights import LayerWeights, Weights
from .checkpoint import Checkpoint
from .safetensors_file import SafetensorsFile
from .tokenizer import HFTokenizer, read_json

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
    model_type = raw.get("model_type")
    if model_type == "gemma3" and isinstance(raw.get("text_config"), dict):
        raw = {**raw["text_config"], "model_type": "gemma3_text"}
    arch = _MODEL_TYPES.get(model_type)
    if arch is None:
        raise UnsupportedModelError(f"unsupported model_type '{model_type}' "
                                    f"(supported: {', '.join(sorted(_MODEL_TYPES))})")
    try:
        hidden, n_heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        scaling = raw.get("rope_scaling") or {}
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type not in (None, "default", "linear"):
            raise UnsupportedModelError(f"unsupported rope scaling '{rope_type}'")
        gemma = arch == "gemma3"
        head_dim = int(raw.get("head_dim") or hidden // n_heads)
        config = ModelConfig(
            arch=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            n_layers=int(raw["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(raw.get("num_key_value_heads") or n_heads),
            head_dim=head_dim,
            ffn_size=int(raw["intermediate_size"]),
            norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            context_length=int(raw.get("max_position_embeddings", 2048)),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            rope_theta_local=float(raw.get("rope_local_base_freq", 10000.0)) if gemma
            else float(raw.get("rope_theta", 10000.0)),
            rope_scale=float(scaling.get("factor", 1.0)) if rope_type == "linear" else 1.0,
            sliding_window=int(raw["sliding_window"]) if gemma and raw.get("sliding_window")
            else None,
            sliding_window_pattern=int(raw.get("sliding_window_pattern", 6)) if gemma else 0,
            attn_scale=float(raw["query_pre_attn_scalar"]) ** -0.5
            if gemma and raw.get("query_pre_attn_scalar", head_dim) != head_dim else 0.0,
            tie_embeddings=bool(raw.get("tie_word_embeddings", gemma)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"config.json lacks or mangles a field ({exc})") from None
    config.validate()
    return config


def _shard_files(folder: Path) -> list[Path]:
    index = read_json(folder / "model.safetensors.index.json")
    if index is None:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ModelFileError(f"{folder}: no *.safetensors files")
        return files
    names = set((index.get("weight_map") or {}).values())
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
            raise ModelFileError(f"{folder}: index names a shard outside the folder: {name!r}")
    return [folder / name for name in sorted(names)]


def load_hf_folder(folder: Path, progress: bool = False) -> Checkpoint:
    raw = read_json(folder / "config.json")
    if raw is None:
        raise ModelFileError(f"{folder} is a folder without config.json (not a model folder)")
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

    def read(name: str):
        if name not in tensors:
            raise ModelFileError(f"{folder}: missing tensor {name}")
        st, full_name = tensors[name]
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

