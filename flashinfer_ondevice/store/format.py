"""Flash store layout: names, version and the manifest records.

    STORE/manifest.json     format, version, codec, config, files (size, sha256), tensors
    STORE/weights.bin       every tensor, each starting on a 4096-byte boundary
    STORE/tokenizer.gguf    (GGUF sources) the source's metadata, no tensors
    STORE/tokenizer.json    (HF sources) plus tokenizer_config.json, generation_config.json

Tensor records: {file, offset, rows, cols, codec, row_nbytes}. A matrix is `rows` encoded rows.
FFN weights are one record per layer, "layers.{i}.ffn", whose row i is neuron i's bundle:
gate row, up row and down column, each encoded on its own, side by side (row_nbytes = 3 x one
encoded row). Vectors (norms, biases) are single f32 rows.
"""

from __future__ import annotations

FORMAT = "flashinfer-ondevice-store"
VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.bin"
ALIGN = 4096
MAX_MANIFEST_BYTES = 64 << 20

# ModelConfig fields of each layer kept in the store, by kind
LAYER_MATRICES = ("wq", "wk", "wv", "wo")
LAYER_VECTORS = ("attn_norm", "ffn_norm", "bq", "bk", "bv", "q_norm", "k_norm",
                 "post_attn_norm", "post_ffn_norm")


def layer_key(layer: int, field: str) -> str:
    return f"layers.{layer}.{field}"


def align_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN
