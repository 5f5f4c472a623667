"""The canonical tensor schema: which tensors a model of a given config has, under which names
and shapes. Both loaders check source files against it and the flash store checks its
manifest against it, so the three never disagree about what a model consists of.

Names: GGUF tensor names (`blk.{i}.attn_q.weight`) for source files; store names
(`layers.{i}.wq`, `embed`, `output`, `final_norm`) in a flash store, where each layer's
gate, up and down matrices are one row-column bundle tensor `layers.{i}.ffn`.
"""

from __future__ import annotations

from .config import ModelConfig

# GGUF tensor suffix of each block -> LayerWeights field
LAYER_TENSORS = {
    "attn_norm": "attn_norm", "attn_q": "wq", "attn_k": "wk", "attn_v": "wv",
    "attn_output": "wo", "ffn_norm": "ffn_norm", "ffn_gate": "w_gate", "ffn_up": "w_up",
    "ffn_down": "w_down", "attn_q.bias": "bq", "attn_k.bias": "bk", "attn_v.bias": "bv",
    "attn_q_norm": "q_norm", "attn_k_norm": "k_norm",
    "post_attention_norm": "post_attn_norm", "post_ffw_norm": "post_ffn_norm",
}


def layer_tensor_name(layer: int, suffix: str) -> str:
    return f"blk.{layer}.{suffix}" + ("" if suffix.endswith(".bias") else ".weight")


# ModelConfig fields of each layer kept in the store, by kind
LAYER_MATRICES = ("wq", "wk", "wv", "wo")
LAYER_VECTORS = ("attn_norm", "ffn_norm", "bq", "bk", "bv", "q_norm", "k_norm",
                 "post_attn_norm", "post_ffn_norm")


def layer_key(layer: int, field: str) -> str:
    return f"layers.{layer}.{field}"


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """numpy-order shape of every tensor the config implies, by GGUF tensor name."""
    h, d = config.hidden_size, config.head_dim
    q_out, kv_out = config.n_heads * d, config.n_kv_heads * d
    traits = config.traits
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (config.vocab_size, h), "output_norm.weight": (h,)}
    if not config.tie_embeddings:
        shapes["output.weight"] = (config.vocab_size, h)
    for i in range(config.n_layers):
        layer = {
            "attn_norm": (h,), "attn_q": (q_out, h), "attn_k": (kv_out, h),
            "attn_v": (kv_out, h), "attn_output": (h, q_out), "ffn_norm": (h,),
            "ffn_gate": (config.ffn_size, h), "ffn_up": (config.ffn_size, h),
            "ffn_down": (h, config.ffn_size),
        }
        if traits.qkv_bias:
            layer.update({"attn_q.bias": (q_out,), "attn_k.bias": (kv_out,),
                          "attn_v.bias": (kv_out,)})
        if traits.qk_norm:
            layer.update({"attn_q_norm": (d,), "attn_k_norm": (d,)})
        if traits.post_norms:
            layer.update({"post_attention_norm": (h,), "post_ffw_norm": (h,)})
        for suffix, shape in layer.items():
            shapes[layer_tensor_name(i, suffix)] = shape
    return shapes


def expected_tensors(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(rows, cols) of every tensor a store of this config must hold: the tensors a GGUF of
    this config holds (expected_shapes above), under store names, with each layer's
    gate/up/down joined into one bundle tensor and vectors as single rows."""
    gguf = expected_shapes(config)
    as_rows = {"token_embd.weight": "embed", "output.weight": "output",
               "output_norm.weight": "final_norm"}
    for i in range(config.n_layers):
        as_rows.update({layer_tensor_name(i, suffix): layer_key(i, field)
                        for suffix, field in LAYER_TENSORS.items()
                        if field not in ("w_gate", "w_up", "w_down")})
    shapes = {as_rows[name]: shape if len(shape) == 2 else (1, shape[0])
              for name, shape in gguf.items() if name in as_rows}
    for i in range(config.n_layers):
        shapes[layer_key(i, "ffn")] = (config.ffn_size, config.hidden_size)
    return shapes
