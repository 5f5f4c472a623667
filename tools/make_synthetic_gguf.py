"""Write a random-weight GGUF with a real model's geometry, for I/O and memory benchmarks.

    python tools/make_synthetic_gguf.py --shape qwen2-7b -o models/synthetic-qwen2-7b.gguf

Tensors are generated and written one at a time as float16 (so a 7B needs ~15 GB of disk but
little RAM), then llama.cpp's own quantizer (through llama-cpp-python) turns the file into
Q4_K_M, the format the real checkpoints ship in, and the float16 file is removed. The
vocabulary is a synthetic SentencePiece one (byte fallback) of the real size. Random weights
say nothing about quality: use these files for speed, bytes read and memory only.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

# Published geometries (config.json of each model)
SHAPES = {
    "qwen2-7b": dict(arch="qwen2", vocab=152064, hidden=3584, layers=28, heads=28, kv_heads=4,
                     head_dim=128, ffn=18944, rope_theta=1e6, tied=False),
    "llama2-7b": dict(arch="llama", vocab=32000, hidden=4096, layers=32, heads=32,
                      kv_heads=32, head_dim=128, ffn=11008, rope_theta=1e4, tied=False),
}
LLAMA_FTYPE_MOSTLY_Q4_K_M = 15


def tensor_shapes(s: dict) -> dict[str, tuple[int, ...]]:
    """GGUF name -> numpy shape (out, in) of every tensor of the geometry."""
    h, q_out, kv_out = s["hidden"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (s["vocab"], h),
                                          "output_norm.weight": (h,)}
    if not s["tied"]:
        shapes["output.weight"] = (s["vocab"], h)
    for i in range(s["layers"]):
        p = f"blk.{i}."
        shapes.update({
            p + "attn_norm.weight": (h,), p + "ffn_norm.weight": (h,),
            p + "attn_q.weight": (q_out, h), p + "attn_k.weight": (kv_out, h),
            p + "attn_v.weight": (kv_out, h), p + "attn_output.weight": (h, q_out),
            p + "ffn_gate.weight": (s["ffn"], h), p + "ffn_up.weight": (s["ffn"], h),
            p + "ffn_down.weight": (h, s["ffn"])})
        if s["arch"] == "qwen2":
            shapes.update({p + "attn_q.bias": (q_out,), p + "attn_k.bias": (kv_out,),
                           p + "attn_v.bias": (kv_out,)})
    return shapes


def random_tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Norms near 1, biases small, matrices N(0, 1/fan_in) (embeddings N(0, 1))."""
    if name.endswith("norm.weight"):
        return (1.0 + 0.1 * rng.standard_normal(shape, np.float32)).astype(np.float32)
    if name.endswith(".bias"):
        return (0.1 * rng.standard_normal(shape, np.float32)).astype(np.float32)
    scale = 1.0 if name == "token_embd.weight" else 1.0 / np.sqrt(shape[1])
    out = np.empty(shape, np.float16)
    for start in range(0, shape[0], 4096):  # a block at a time: bounded float32 scratch
        block = rng.standard_normal((min(4096, shape[0] - start), shape[1]), np.float32)
        out[start:start + len(block)] = block * scale
    return out


def write_f16(path: Path, s: dict, seed: int) -> None:
    shapes = tensor_shapes(s)
    writer = gguf.GGUFWriter(str(path), s["arch"])
    writer.add_name("synthetic random weights")
    writer.add_block_count(s["layers"])
    writer.add_context_length(4096)
    writer.add_embedding_length(s["hidden"])
    writer.add_feed_forward_length(s["ffn"])
    writer.add_head_count(s["heads"])
    writer.add_head_count_kv(s["kv_heads"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(s["rope_theta"])
    pieces = [f"\u2581w{i}" for i in range(s["vocab"] - 259)]
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
                          + pieces)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    for name, shape in shapes.items():
        dtype = np.float32 if len(shape) == 1 else np.float16
        writer.add_tensor_info(name, shape, np.dtype(dtype),
                               int(np.prod(shape)) * np.dtype(dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    total = sum(int(np.prod(shape)) for shape in shapes.values())
    with tqdm(total=total, unit=" weights", unit_scale=True, desc="writing f16") as bar:
        for name, shape in shapes.items():
            writer.write_tensor_data(random_tensor(rng, name, shape))
            bar.update(int(np.prod(shape)))
    writer.close()


def quantize(source: Path, target: Path, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(),
                                        ctypes.byref(params))
    if rc != 0:
        sys.exit(f"llama.cpp quantize failed (rc={rc})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-7b")
    parser.add_argument("-o", "--output", type=Path, required=True, help="Q4_K_M GGUF to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    if args.output.exists():
        sys.exit(f"{args.output} already exists")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    f16 = args.output.with_name(args.output.name + ".f16.partial")
    partial = args.output.with_name(args.output.name + ".partial")
    try:
        write_f16(f16, SHAPES[args.shape], args.seed)
        print("quantizing to Q4_K_M with llama.cpp ...", flush=True)
        quantize(f16, partial, args.threads)
        os.replace(partial, args.output)
    finally:
        f16.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
