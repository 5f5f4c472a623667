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

import json
import os
from pathlib import Path

FORMAT = "flashinfer-ondevice-store"
VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.bin"
ALIGN = 4096
MAX_MANIFEST_BYTES = 64 << 20

def align_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def write_manifest(folder: Path, manifest: dict) -> None:
    """Replace folder's manifest atomically: a partial file, synced, then renamed over it."""
    tmp = folder / (MANIFEST + ".partial")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)
