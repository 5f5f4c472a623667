"""Tiny random-weight models written with gguf's writer (and as Hugging Face folders), so the
engine can be checked against llama.cpp for every architecture without downloading anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np

# A small SentencePiece-style vocabulary llama.cpp accepts: specials, 256 byte tokens, letters.
_SPECIALS = ["<unk>", "<s>", "</s>"]
_PIECES = ["\u2581" + c for c in "abcdefghijklmnopqrstuvwxyz"] + list("abcdefghijklmnopqrstuvwxyz")


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    tokens = _SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + _PIECES
    scores = [0.0] * 3 + [0.0] * 256 + [-float(i) for i in range(len(_PIECES))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(_PIECES)  # unknown, control, byte, normal
    return tokens, scores, types


def add_tokenizer(writer: gguf.GGUFWriter, tokens: list[str], scores: list[float],
                  types: list[int], model: str = "llama") -> None:
    """The tokenizer keys of a GGUF: the vocabulary, with <unk> 0, BOS 1 and EOS 2."""
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)


SHAPES = {
    "llama": dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=128),
    "qwen2": dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=128),
    "gemma3": dict(hidden=64, layers=7, heads=2, kv_heads=1, head_dim=32, ffn=128),
}


def random_weights(arch: str, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-layout float32 weights under GGUF names (norms as GGUF stores them: used directly)."""
    s = SHAPES[arch]
    rng = np.random.default_rng(seed)
    h, d, vocab = s["hidden"], s["head_dim"], len(vocabulary()[0])

    def mat(out, inp):
        return (rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = {"token_embd.weight": mat(vocab, h) * 4, "output_norm.weight": norm(h)}
    if arch == "llama":
        w["output.weight"] = mat(vocab, h)
    for i in range(s["layers"]):
        p = f"blk.{i}."
        w.update({
            p + "attn_norm.weight": norm(h), p + "ffn_norm.weight": norm(h),
            p + "attn_q.weight": mat(s["heads"] * d, h),
            p + "attn_k.weight": mat(s["kv_heads"] * d, h),
            p + "attn_v.weight": mat(s["kv_heads"] * d, h),
            p + "attn_output.weight": mat(h, s["heads"] * d),
            p + "ffn_gate.weight": mat(s["ffn"], h), p + "ffn_up.weight": mat(s["ffn"], h),
            p + "ffn_down.weight": mat(h, s["ffn"]),
        })
        if arch == "qwen2":
            for name, n in (("q", s["heads"] * d), ("k", s["kv_heads"] * d),
                            ("v", s["kv_heads"] * d)):
                w[p + f"attn_{name}.bias"] = (0.1 * rng.standard_normal(n)).astype(np.float32)
        if arch == "gemma3":
            w.update({p + "attn_q_norm.weight": norm(d), p + "attn_k_norm.weight": norm(d),
                      p + "post_attention_norm.weight": norm(h),
                      p + "post_ffw_norm.weight": norm(h)})
    return w


def permute_for_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Llama q/k rows (interleaved rope)."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_gguf(path: Path, arch: str, seed: int = 0, chat_template: str | None = None,
               weights: dict[str, np.ndarray] | None = None,
               context_length: int = 256) -> Path:
    s = SHAPES[arch]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(s["layers"])
    writer.add_context_length(context_length)
    writer.add_embedding_length(s["hidden"])
    writer.add_feed_forward_length(s["ffn"])
    writer.add_head_count(s["heads"])
    writer.add_head_count_kv(s["kv_heads"])
    writer.add_key_length(s["head_dim"])
    writer.add_value_length(s["head_dim"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0 if arch != "gemma3" else 1e6)
    if arch == "gemma3":
        writer.add_sliding_window(4)
    writer.add_tokenizer_pre("default")
    add_tokenizer(writer, *vocabulary())
    writer.add_add_bos_token(True)
    if chat_template:
        writer.add_chat_template(chat_template)
    for name, value in (weights or random_weights(arch, seed)).items():
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = s["heads"] if "attn_q" in name else s["kv_heads"]
            value = permute_for_llama_cpp(value, heads)
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_hf_folder(folder: Path, arch: str, seed: int = 0,
                    context_length: int = 256) -> Path:
    """The same weights as `write_gguf(arch, seed)`, as a Hugging Face folder."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    s = SHAPES[arch]
    w = random_weights(arch, seed)
    folder.mkdir(parents=True, exist_ok=True)
    hf: dict[str, np.ndarray] = {}
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
             "attn_norm": "input_layernorm", "attn_q_norm": "self_attn.q_norm",
             "attn_k_norm": "self_attn.k_norm"}
    if arch == "gemma3":
        names.update({"ffn_norm": "pre_feedforward_layernorm",
                      "post_attention_norm": "post_attention_layernorm",
                      "post_ffw_norm": "post_feedforward_layernorm"})
    else:
        names["ffn_norm"] = "post_attention_layernorm"
    for name, value in w.items():
        if name.startswith("blk."):
            _, i, rest = name.split(".", 2)
            base, kind = rest.rsplit(".", 1)
            key = f"model.layers.{i}.{names[base]}.{kind}"
            if arch == "gemma3" and base.endswith("norm"):
                value = value - 1.0  # HF Gemma stores w, used as 1 + w
            hf[key] = value
    hf["model.embed_tokens.weight"] = w["token_embd.weight"]
    hf["model.norm.weight"] = w["output_norm.weight"] - (1.0 if arch == "gemma3" else 0.0)
    if "output.weight" in w:
        hf["lm_head.weight"] = w["output.weight"]
    save_file(hf, str(folder / "model.safetensors"))
    model_type = {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3_text"}[arch]
    config = {
        "model_type": model_type, "vocab_size": len(vocabulary()[0]),
        "hidden_size": s["hidden"], "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"],
        "head_dim": s["head_dim"], "intermediate_size": s["ffn"], "rms_norm_eps": 1e-6,
        "max_position_embeddings": context_length,
        "rope_theta": 10000.0 if arch != "gemma3" else 1e6,
        "tie_word_embeddings": arch != "llama", "bos_token_id": 1, "eos_token_id": 2,
    }
    if arch == "gemma3":
        config.update({"sliding_window": 4, "rope_local_base_freq": 10000.0,
                       "query_pre_attn_scalar": s["head_dim"], "sliding_window_pattern": 6})
    (folder / "config.json").write_text(json.dumps(config))
    tokens, _, _ = vocabulary()
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, "<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder
