"""The hostile-input corpus: malformed files, flags and API calls, each with its expected outcome.

Generated, never committed as binaries: every case writes its inputs from the tiny models of
`tiny_models.py` (a GGUF, a Hugging Face folder, a flash store converted from the GGUF), edited
the way an attacker or a careless user would. A case is run by `hostile_runner` as a
`run-model` command line ("cli") or a Python snippet against the public API ("api"), and is
judged on its outcome: "error" (one line naming `cause`, non-zero exit) or "ok" (exit 0,
`cause` in the output). Categories: gguf, vocab, template, hf, safetensors, store, files,
cli, api.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGUFValueType as T
from hostile_runner import CLOSED
from tiny_models import SHAPES, random_weights, vocabulary, write_hf_folder

from flashinfer_ondevice.store.format import UNFINISHED

# Case inputs are built in a folder from these, made once per session (see `Bases`).
Build = Callable[["Bases", Path], list[str]]


@dataclass(frozen=True)
class Case:
    name: str
    category: str
    kind: str  # "cli" or "api"
    build: Build  # writes the inputs into the case's folder, returns the args
    expect: str  # "error" or "ok"
    cause: str  # substring of the error line (or of stdout when "ok")
    stdin: str | None = None  # None: empty; hostile_runner.CLOSED: no file descriptor 0
    env: tuple[tuple[str, str], ...] = ()  # environment variables set for the case
                                           # ("{folder}" stands for the case's folder)


@dataclass(frozen=True)
class Bases:
    """The session's well-formed inputs that cases copy and damage."""

    gguf: Path  # tiny gemma3 GGUF
    hf: Path  # tiny llama Hugging Face folder
    store: Path  # tiny gemma3 int8 store


GEN = ["-p", "abc", "-n", "2", "--temp", "0", "-t", "1"]  # a short greedy generation


# --- GGUF writing ---------------------------------------------------------------------------

def base_metadata(arch: str = "gemma3") -> dict[str, tuple]:
    """The tiny model's metadata: key -> (value, type[, array item type])."""
    s = SHAPES[arch]
    tokens, scores, types = vocabulary()
    meta = {
        f"{arch}.block_count": (s["layers"], T.UINT32),
        f"{arch}.context_length": (256, T.UINT32),
        f"{arch}.embedding_length": (s["hidden"], T.UINT32),
        f"{arch}.feed_forward_length": (s["ffn"], T.UINT32),
        f"{arch}.attention.head_count": (s["heads"], T.UINT32),
        f"{arch}.attention.head_count_kv": (s["kv_heads"], T.UINT32),
        f"{arch}.attention.key_length": (s["head_dim"], T.UINT32),
        f"{arch}.attention.value_length": (s["head_dim"], T.UINT32),
        f"{arch}.attention.layer_norm_rms_epsilon": (1e-6, T.FLOAT32),
        f"{arch}.rope.freq_base": (1e6 if arch == "gemma3" else 1e4, T.FLOAT32),
        "tokenizer.ggml.model": ("llama", T.STRING),
        "tokenizer.ggml.pre": ("default", T.STRING),
        "tokenizer.ggml.tokens": (tokens, T.ARRAY, T.STRING),
        "tokenizer.ggml.scores": (scores, T.ARRAY, T.FLOAT32),
        "tokenizer.ggml.token_type": (types, T.ARRAY, T.INT32),
        "tokenizer.ggml.bos_token_id": (1, T.UINT32),
        "tokenizer.ggml.eos_token_id": (2, T.UINT32),
        "tokenizer.ggml.unknown_token_id": (0, T.UINT32),
        "tokenizer.ggml.add_bos_token": (True, T.BOOL),
    }
    if arch == "gemma3":
        meta["gemma3.attention.sliding_window"] = (4, T.UINT32)
    return meta


def write_gguf(path: Path, meta: dict[str, tuple] | None = None,
               weights: dict[str, np.ndarray] | None = None, arch: str = "gemma3",
               architecture: str | None = None) -> Path:
    """A GGUF with `meta` (default: the tiny model's) and `weights` (default: random)."""
    writer = gguf.GGUFWriter(str(path), arch if architecture is None else architecture)
    for key, (value, vtype, *sub) in (base_metadata(arch) if meta is None else meta).items():
        writer.add_key_value(key, value, vtype, sub[0] if sub else None)
    for name, value in (random_weights(arch) if weights is None else weights).items():
        if isinstance(value, _RawTensor):
            writer.add_tensor(name, np.asarray(value), raw_dtype=value.ggml_type)
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _meta_case(name: str, key: str, value, vtype, cause: str, sub=None,
               expect: str = "error") -> Case:
    def build(bases: Bases, folder: Path) -> list[str]:
        meta = base_metadata()
        full = key if key.startswith(("tokenizer.", "general.")) else f"gemma3.{key}"
        if value is _DROP:
            meta.pop(full)
        else:
            meta[full] = (value, vtype, sub) if sub is not None else (value, vtype)
        return ["-m", str(write_gguf(folder / "m.gguf", meta)), *GEN]
    return Case(f"gguf-meta-{name}", "gguf", "cli", build, expect, cause)


_DROP = object()


def _weights_case(name: str, edit: Callable[[dict], None], cause: str) -> Case:
    def build(bases: Bases, folder: Path) -> list[str]:
        weights = random_weights("gemma3")
        edit(weights)
        return ["-m", str(write_gguf(folder / "m.gguf", weights=weights)), *GEN]
    return Case(f"gguf-tensor-{name}", "gguf", "cli", build, "error", cause)


class _RawTensor(np.ndarray):
    """A tensor's bytes in a GGML type numpy lacks (rows of encoded blocks)."""

    ggml_type: gguf.GGMLQuantizationType


def _raw_tensor(qtype: gguf.GGMLQuantizationType, shape: tuple[int, int]) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.zeros((shape[0], shape[1] // block * size), np.uint8).view(_RawTensor)
    raw.ggml_type = qtype
    return raw


def _bytes_case(name: str, edit: Callable[[bytearray], bytes], cause: str,
                category: str = "gguf") -> Case:
    def build(bases: Bases, folder: Path) -> list[str]:
        target = folder / "m.gguf"
        data = edit(bytearray(bases.gguf.read_bytes()))
        target.write_bytes(data.removesuffix(SPARSE_TAIL))
        if data.endswith(SPARSE_TAIL):
            _truncate(target, (1 << 36) + (64 << 10))
        return ["-m", str(target), *GEN]
    return Case(f"gguf-bytes-{name}", category, "cli", build, "error", cause)


def _first_kv(data: bytearray) -> tuple[int, int]:
    """(offset of the first key's length, offset of its value type) in a GGUF."""
    (length,) = struct.unpack_from("<Q", data, 24)
    return 24, 32 + length


def _patch(offset: int, fmt: str, value) -> Callable[[bytearray], bytes]:
    def edit(data: bytearray) -> bytes:
        struct.pack_into(fmt, data, offset, value)
        return bytes(data)
    return edit


def gguf_cases() -> list[Case]:
    cases = [
        _meta_case("freq-base-string", "rope.freq_base", "1e6", T.STRING, "rope.freq_base"),
        _meta_case("freq-base-array", "rope.freq_base", [1.0, 2.0], T.ARRAY, "rope.freq_base",
                   T.FLOAT32),
        _meta_case("freq-base-negative", "rope.freq_base", -1.0, T.FLOAT32, "rope.freq_base"),
        _meta_case("freq-base-inf", "rope.freq_base", float("inf"), T.FLOAT32,
                   "rope.freq_base"),
        _meta_case("freq-base-nan", "rope.freq_base", float("nan"), T.FLOAT32,
                   "rope.freq_base"),
        _meta_case("freq-base-zero", "rope.freq_base", 0.0, T.FLOAT32, "rope.freq_base"),
        _meta_case("eps-inf", "attention.layer_norm_rms_epsilon", float("inf"), T.FLOAT32,
                   "layer_norm_rms_epsilon"),
        _meta_case("eps-nan", "attention.layer_norm_rms_epsilon", float("nan"), T.FLOAT32,
                   "layer_norm_rms_epsilon"),
        _meta_case("eps-zero", "attention.layer_norm_rms_epsilon", 0.0, T.FLOAT32,
                   "layer_norm_rms_epsilon"),
        _meta_case("eps-negative", "attention.layer_norm_rms_epsilon", -1e-6, T.FLOAT32,
                   "layer_norm_rms_epsilon"),
        _meta_case("eps-huge", "attention.layer_norm_rms_epsilon", 1e30, T.FLOAT32,
                   "layer_norm_rms_epsilon"),
        _meta_case("eps-string", "attention.layer_norm_rms_epsilon", "tiny", T.STRING,
                   "layer_norm_rms_epsilon"),
        _meta_case("window-string", "attention.sliding_window", "4", T.STRING,
                   "sliding_window"),
        _meta_case("window-negative", "attention.sliding_window", -4, T.INT32,
                   "sliding_window"),
        _meta_case("window-float", "attention.sliding_window", 4.5, T.FLOAT32,
                   "sliding_window"),
        _meta_case("window-array", "attention.sliding_window", [4], T.ARRAY, "sliding_window",
                   T.INT32),
        _meta_case("blocks-zero", "block_count", 0, T.UINT32, "block_count"),
        _meta_case("blocks-huge", "block_count", 1 << 31, T.UINT32, "block_count"),
        _meta_case("blocks-string", "block_count", "7", T.STRING, "block_count"),
        _meta_case("blocks-largest", "block_count", (1 << 24) - 1, T.UINT32, "block_count"),
        _meta_case("blocks-negative", "block_count", -7, T.INT32, "block_count"),
        _meta_case("blocks-bool", "block_count", True, T.BOOL, "block_count"),
        _meta_case("blocks-missing", "block_count", _DROP, None, "block_count"),
        _meta_case("hidden-zero", "embedding_length", 0, T.UINT32, "embedding_length"),
        _meta_case("hidden-float", "embedding_length", 64.0, T.FLOAT32, "embedding_length"),
        _meta_case("hidden-mismatch", "embedding_length", 128, T.UINT32, "shape"),
        _meta_case("heads-zero", "attention.head_count", 0, T.UINT32, "head_count"),
        _meta_case("heads-string", "attention.head_count", "two", T.STRING, "head_count"),
        _meta_case("kv-heads-zero", "attention.head_count_kv", 0, T.UINT32, "head_count_kv"),
        _meta_case("kv-heads-not-divisor", "attention.head_count_kv", 3, T.UINT32,
                   "head_count_kv"),
        _meta_case("kv-heads-string", "attention.head_count_kv", "1", T.STRING,
                   "head_count_kv"),
        _meta_case("kv-heads-array", "attention.head_count_kv", [1] * 7, T.ARRAY,
                   "head_count_kv", T.INT32),
        _meta_case("key-length-odd", "attention.key_length", 31, T.UINT32, "key_length"),
        _meta_case("key-length-zero", "attention.key_length", 0, T.UINT32, "key_length"),
        _meta_case("key-length-float", "attention.key_length", 32.0, T.FLOAT32, "key_length"),
        _meta_case("ffn-zero", "feed_forward_length", 0, T.UINT32, "feed_forward_length"),
        _meta_case("ffn-string", "feed_forward_length", "128", T.STRING,
                   "feed_forward_length"),
        _meta_case("context-zero", "context_length", 0, T.UINT32, "context_length"),
        _meta_case("context-huge", "context_length", 1 << 40, T.UINT64, "context_length"),
        _meta_case("context-float", "context_length", 256.0, T.FLOAT32, "context_length"),
        _meta_case("rope-scaling-yarn", "rope.scaling.type", "yarn", T.STRING, "yarn"),
        _meta_case("rope-scaling-int", "rope.scaling.type", 3, T.UINT32, "rope.scaling.type"),
        _vocab_case("rope-factor-zero", lambda m: (
            m.__setitem__("gemma3.rope.scaling.type", ("linear", T.STRING)),
            m.__setitem__("gemma3.rope.scaling.factor", (0.0, T.FLOAT32))),
            "rope.scaling.factor", category="gguf"),
        _meta_case("alignment-zero", "general.alignment", 0, T.UINT32, "alignment"),
        _meta_case("alignment-odd", "general.alignment", 3, T.UINT32, "alignment"),
        _meta_case("alignment-string", "general.alignment", "32", T.STRING, "alignment"),
        _weights_case("missing", lambda w: w.pop("blk.3.ffn_up.weight"), "blk.3.ffn_up"),
        _weights_case("wrong-shape", lambda w: w.update(
            {"blk.0.attn_q.weight": np.zeros((32, 64), np.float32)}), "blk.0.attn_q"),
        _weights_case("nan", lambda w: w["blk.2.ffn_down.weight"].__setitem__((0, 0),
                                                                            np.nan),
                      "blk.2.ffn_down"),
        _weights_case("inf-norm", lambda w: w["output_norm.weight"].__setitem__(3, np.inf),
                      "output_norm"),
        _weights_case("3d", lambda w: w.update(
            {"blk.1.ffn_up.weight": np.zeros((2, 64, 64), np.float32)}), "blk.1.ffn_up"),
        _weights_case("unsupported-type", lambda w: w.update(
            {"blk.0.ffn_up.weight": _raw_tensor(gguf.GGMLQuantizationType.IQ4_NL, (128, 64))}),
            "IQ4_NL"),
        _weights_case("embedding-short", lambda w: w.update(
            {"token_embd.weight": w["token_embd.weight"][:100].copy()}), "vocabulary"),
    ]
    for arch_name, cause in (("gpt9", "gpt9"), ("", "architecture"),
                             ("\x1b[31mevil\x1b[0m", "unsupported architecture")):
        def build(bases, folder, arch_name=arch_name):
            return ["-m", str(write_gguf(folder / "m.gguf", architecture=arch_name)), *GEN]
        cases.append(Case(f"gguf-arch-{cause.split()[0]}", "gguf", "cli", build, "error",
                          cause))
    cases += [
        _bytes_case("not-gguf", lambda d: b"PK\x03\x04" + bytes(d[4:]), "not a GGUF"),
        _bytes_case("empty", lambda d: b"", "not a GGUF"),
        _bytes_case("magic-only", lambda d: bytes(d[:4]), "truncated"),
        _bytes_case("cut-header", lambda d: bytes(d[:200]), "truncated"),
        _bytes_case("cut-data", lambda d: bytes(d[:len(d) * 2 // 3]), "truncated"),
        _bytes_case("version-1", _patch(4, "<I", 1), "version"),
        _bytes_case("version-99", _patch(4, "<I", 99), "version"),
        _bytes_case("tensor-count-huge", _patch(8, "<Q", 1 << 62), "tensors"),
        _bytes_case("kv-count-huge", _patch(16, "<Q", 1 << 62), "metadata"),
        _bytes_case("kv-count-short", _patch(16, "<Q", 3), "GGUF"),
        _bytes_case("key-length-huge", _patch(24, "<Q", 1 << 63), "truncated"),
        _bytes_case("value-type-unknown",
                    lambda d: _patch(_first_kv(d)[1], "<I", 99)(d), "value type"),
        _bytes_case("value-type-array-of-arrays",
                    lambda d: _array_item_type(d, 9), "array"),
        _bytes_case("array-count-huge", lambda d: _array_count(d, 1 << 60), "truncated"),
        _bytes_case("tensor-type-unknown", lambda d: _tensor_field(d, "type", 200), "type"),
        _bytes_case("tensor-dims-5", lambda d: _tensor_field(d, "n_dims", 5), "dimensions"),
        _bytes_case("tensor-dim-zero", lambda d: _tensor_field(d, "dim0", 0), "shape"),
        _bytes_case("tensor-dim-wraps", lambda d: _tensor_field(d, "dim0", 1 << 63), "shape"),
        _bytes_case("tensor-offset-beyond", lambda d: _tensor_field(d, "offset", 1 << 40),
                    "truncated"),
        _bytes_case("tensor-offset-misaligned", lambda d: _tensor_field(d, "offset", 7),
                    "aligned"),
        _bytes_case("tensor-name-duplicate", _duplicate_tensor_name, "twice"),
        _bytes_case("metadata-key-duplicate", _duplicate_key, "twice"),
        _bytes_case("string-huge-sparse", lambda d: _sparse_string(d, "tokenizer.ggml.pre"),
                    "limit"),
        _bytes_case("token-huge-sparse", lambda d: _sparse_string(d, "tokenizer.ggml.tokens"),
                    "limit"),
    ]
    return cases


def _walk(data: bytes):
    """Offsets of a GGUF's pieces: yields ("kv", key, type_at, value_at) per metadata entry
    and ("tensor", name, n_dims_at, None) per tensor record."""
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def string(pos):
        (n,) = struct.unpack_from("<Q", data, pos)
        return data[pos + 8:pos + 8 + n].decode(errors="replace"), pos + 8 + n

    def skip(vtype, pos):
        sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
        if vtype in sizes:
            return pos + sizes[vtype]
        if vtype == 8:
            return string(pos)[1]
        item, count = struct.unpack_from("<IQ", data, pos)
        pos += 12
        for _ in range(count):
            pos = skip(item, pos)
        return pos

    for _ in range(n_kv):
        key, pos = string(pos)
        (vtype,) = struct.unpack_from("<I", data, pos)
        yield "kv", key, pos, pos + 4
        pos = skip(vtype, pos + 4)
    for _ in range(n_tensors):
        name, pos = string(pos)
        yield "tensor", name, pos, None
        (n_dims,) = struct.unpack_from("<I", data, pos)
        pos += 4 + 8 * n_dims + 4 + 8


def _sparse_string(data: bytearray, key: str) -> bytes:
    """`key`'s string (or its array's first string) claims 2**36 bytes: the file ends where
    the claim starts, padded to the claimed size by a hole (see _bytes_case's writer)."""
    for _kind, name, _, value_at in _walk(bytes(data)):
        if name == key:
            at = value_at + (12 if key.endswith("tokens") else 0)
            struct.pack_into("<Q", data, at, 1 << 36)
            return bytes(data[:at + 8]) + SPARSE_TAIL
    raise AssertionError(f"no {key}")


SPARSE_TAIL = b"\0sparse"  # _bytes_case: extend the file to 2**36 + 64 KiB bytes, a hole


def _array_item_type(data: bytearray, item_type: int) -> bytes:
    for _kind, key, _, value_at in _walk(bytes(data)):
        if key == "tokenizer.ggml.scores":
            struct.pack_into("<I", data, value_at, item_type)
            return bytes(data)
    raise AssertionError("no scores array")


def _array_count(data: bytearray, count: int) -> bytes:
    for _kind, key, _, value_at in _walk(bytes(data)):
        if key == "tokenizer.ggml.token_type":
            struct.pack_into("<Q", data, value_at + 4, count)
            return bytes(data)
    raise AssertionError("no token_type array")


def _tensor_field(data: bytearray, field: str, value: int) -> bytes:
    for kind, name, n_dims_at, _ in _walk(bytes(data)):
        if kind == "tensor" and name == "blk.0.ffn_up.weight":
            (n_dims,) = struct.unpack_from("<I", data, n_dims_at)
            at = {"n_dims": (n_dims_at, "<I"), "dim0": (n_dims_at + 4, "<Q"),
                  "type": (n_dims_at + 4 + 8 * n_dims, "<I"),
                  "offset": (n_dims_at + 8 + 8 * n_dims, "<Q")}[field]
            struct.pack_into(at[1], data, at[0], value)
            return bytes(data)
    raise AssertionError("no such tensor")


def _duplicate_tensor_name(data: bytearray) -> bytes:
    return bytes(data).replace(b"blk.0.attn_k.weight", b"blk.0.attn_q.weight", 1)


# --- vocabularies (handed to llama.cpp) ------------------------------------------------------

def _vocab_case(name: str, edit: Callable[[dict], None], cause: str,
                expect: str = "error", category: str = "vocab") -> Case:
    def build(bases: Bases, folder: Path) -> list[str]:
        meta = base_metadata()
        edit(meta)
        return ["-m", str(write_gguf(folder / "m.gguf", meta)), *GEN]
    return Case(f"{category}-{name}", category, "cli", build, expect, cause)


def _tokens(edit: Callable[[list[str]], None]) -> Callable[[dict], None]:
    def apply(meta: dict) -> None:
        tokens = list(meta["tokenizer.ggml.tokens"][0])
        edit(tokens)
        meta["tokenizer.ggml.tokens"] = (tokens, T.ARRAY, T.STRING)
    return apply


def _set(key: str, value, vtype, sub=None) -> Callable[[dict], None]:
    def apply(meta: dict) -> None:
        meta[key] = (value, vtype) if sub is None else (value, vtype, sub)
    return apply


def _drop(key: str) -> Callable[[dict], None]:
    return lambda meta: meta.pop(key)


def vocab_cases() -> list[Case]:
    n = len(vocabulary()[0])
    return [
        _vocab_case("duplicate-token", _tokens(lambda t: t.__setitem__(300, t[301])),
                    "appears twice"),
        _vocab_case("duplicate-special", _tokens(lambda t: t.__setitem__(2, "<s>")),
                    "appears twice"),
        _vocab_case("tokens-missing", _drop("tokenizer.ggml.tokens"), "tokenizer.ggml.tokens"),
        _vocab_case("tokens-not-strings", _set("tokenizer.ggml.tokens", list(range(n)),
                                               T.ARRAY, T.INT32), "tokenizer.ggml.tokens"),
        _vocab_case("tokens-string", _set("tokenizer.ggml.tokens", "abc", T.STRING),
                    "tokenizer.ggml.tokens"),
        _vocab_case("tokens-fewer", _tokens(lambda t: t.pop()), "vocabulary"),
        _vocab_case("token-empty", _tokens(lambda t: t.__setitem__(300, "")), "empty"),
        _vocab_case("scores-short", _set("tokenizer.ggml.scores", [0.0] * 10, T.ARRAY,
                                         T.FLOAT32), "tokenizer.ggml.scores"),
        _vocab_case("scores-strings", _set("tokenizer.ggml.scores", ["a"] * n, T.ARRAY,
                                           T.STRING), "tokenizer.ggml.scores"),
        _vocab_case("scores-nan", _set("tokenizer.ggml.scores", [float("nan")] * n, T.ARRAY,
                                       T.FLOAT32), "tokenizer.ggml.scores"),
        _vocab_case("types-short", _set("tokenizer.ggml.token_type", [1] * 10, T.ARRAY,
                                        T.INT32), "tokenizer.ggml.token_type"),
        _vocab_case("types-out-of-range", _set("tokenizer.ggml.token_type", [99] * n, T.ARRAY,
                                               T.INT32), "tokenizer.ggml.token_type"),
        _vocab_case("types-float", _set("tokenizer.ggml.token_type", [1.0] * n, T.ARRAY,
                                        T.FLOAT32), "tokenizer.ggml.token_type"),
        _vocab_case("bos-out-of-range", _set("tokenizer.ggml.bos_token_id", 10**6, T.UINT32),
                    "bos_token_id"),
        _vocab_case("eos-out-of-range", _set("tokenizer.ggml.eos_token_id", n, T.UINT32),
                    "eos_token_id"),
        _vocab_case("unk-string", _set("tokenizer.ggml.unknown_token_id", "0", T.STRING),
                    "unknown_token_id"),
        _vocab_case("bos-negative", _set("tokenizer.ggml.bos_token_id", -5, T.INT32),
                    "bos_token_id"),
        _vocab_case("model-unknown", _set("tokenizer.ggml.model", "sentencepiece9", T.STRING),
                    "tokenizer.ggml.model"),
        _vocab_case("model-int", _set("tokenizer.ggml.model", 1, T.UINT32),
                    "tokenizer.ggml.model"),
        _vocab_case("model-missing", _drop("tokenizer.ggml.model"), "tokenizer.ggml.model"),
        _vocab_case("gpt2-no-merges", _set("tokenizer.ggml.model", "gpt2", T.STRING),
                    "merges"),
        _vocab_case("merges-bad", lambda m: (
            m.__setitem__("tokenizer.ggml.model", ("gpt2", T.STRING)),
            m.__setitem__("tokenizer.ggml.merges", (["a"] * 5, T.ARRAY, T.STRING))),
            "merges"),
        _vocab_case("add-bos-string", _set("tokenizer.ggml.add_bos_token", "yes", T.STRING),
                    "add_bos_token"),
        # findings of the fuzzer: llama.cpp aborts (std::out_of_range) on these
        _vocab_case("byte-token-missing", _tokens(lambda t: t.__setitem__(3 + 0xC3, "\u2581" * 3)),
                    "byte token"),
        _vocab_case("byte-type-on-text", _set("tokenizer.ggml.token_type",
                                              [2, 3, 3] + [6] * 256 + [6] * 52, T.ARRAY,
                                              T.INT32), "byte"),
        _vocab_case("token-escape-ok", _tokens(lambda t: t.__setitem__(300, "\x1b[2J")),
                    "", expect="ok"),
    ]


# --- chat templates ---------------------------------------------------------------------------

def _template_case(name: str, template, cause: str, expect: str = "error",
                   vtype=T.STRING) -> Case:
    def build(bases: Bases, folder: Path) -> list[str]:
        meta = base_metadata()
        meta["tokenizer.chat_template"] = (template, vtype)
        return ["-m", str(write_gguf(folder / "m.gguf", meta)), *GEN]
    return Case(f"template-{name}", "template", "cli", build, expect, cause)


def template_cases() -> list[Case]:
    loop = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    return [
        _template_case("nested-loops", loop, "chat template"),
        _template_case("string-times-huge", "{{ 'x' * 10**12 }}", "chat template"),
        _template_case("power-tower", "{{ 10 ** (10 ** 10) }}", "chat template"),
        _template_case("output-20mb", "{% for i in range(20000) %}{{ 'y' * 1000 }}{% endfor %}",
                       "chat template"),
        _template_case("ljust-huge", "{{ 'x'.ljust(10**10) }}", "chat template"),
        _template_case("center-huge", "{{ 'x'|center(10**10) }}", "chat template"),
        _template_case("syntax-error", "{% for %}", "chat template"),
        _template_case("raise", "{{ raise_exception('no system role') }}", "no system role"),
        _template_case("unsafe-attr", "{{ ''.__class__.__mro__[1].__subclasses__() }}",
                       "chat template"),
        _template_case("deep-nesting", "{% if 1 %}" * 3000 + "x" + "{% endif %}" * 3000,
                       "chat template"),
        _template_case("recursive-macro", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}"
                       "{{ f(0) }}", "chat template"),
        _template_case("not-a-string", 7, "chat_template", vtype=T.UINT32),
        _template_case("plain-ok", "{% for m in messages %}{{ m['content'] }}{% endfor %}",
                       "", expect="ok"),
    ]


# --- Hugging Face folders -------------------------------------------------------------------

def _hf_copy(bases: Bases, folder: Path) -> Path:
    target = folder / "hf"
    shutil.copytree(bases.hf, target)
    return target


def _config_case(name: str, edit: Callable[[dict], object], cause: str,
                 expect: str = "error") -> Case:
    def build(bases: Bases, folder: Path) -> list[str]:
        target = _hf_copy(bases, folder)
        config = json.loads((target / "config.json").read_text())
        replaced = edit(config)
        text = replaced if isinstance(replaced, bytes | str) else json.dumps(config)
        (target / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["-m", str(target), *GEN]
    return Case(f"hf-config-{name}", "hf", "cli", build, expect, cause)


def _cfg(key: str, value) -> Callable[[dict], None]:
    return lambda c: c.__setitem__(key, value)


def hf_cases() -> list[Case]:
    cases = [
        _config_case("hidden-string", _cfg("hidden_size", "64"), "hidden_size"),
        _config_case("hidden-float", _cfg("hidden_size", 64.5), "hidden_size"),
        _config_case("hidden-bool", _cfg("hidden_size", True), "hidden_size"),
        _config_case("hidden-negative", _cfg("hidden_size", -64), "hidden_size"),
        _config_case("hidden-huge", _cfg("hidden_size", 10**30), "hidden_size"),
        _config_case("heads-zero", _cfg("num_attention_heads", 0), "num_attention_heads"),
        _config_case("heads-null", _cfg("num_attention_heads", None), "num_attention_heads"),
        _config_case("kv-heads-list", _cfg("num_key_value_heads", [2]), "num_key_value_heads"),
        _config_case("layers-largest", _cfg("num_hidden_layers", (1 << 24) - 1),
                     "num_hidden_layers"),
        _config_case("layers-missing", lambda c: c.pop("num_hidden_layers"),
                     "num_hidden_layers"),
        _config_case("eps-infinity", lambda c: json.dumps(c).replace('"rms_norm_eps": 1e-06',
                                                                     '"rms_norm_eps": Infinity'),
                     "rms_norm_eps"),
        _config_case("eps-nan", lambda c: json.dumps(c).replace('"rms_norm_eps": 1e-06',
                                                                '"rms_norm_eps": NaN'),
                     "rms_norm_eps"),
        _config_case("eps-zero", _cfg("rms_norm_eps", 0), "rms_norm_eps"),
        _config_case("eps-string", _cfg("rms_norm_eps", "1e-6"), "rms_norm_eps"),
        _config_case("rope-theta-negative", _cfg("rope_theta", -10000.0), "rope_theta"),
        _config_case("rope-theta-dict", _cfg("rope_theta", {"a": 1}), "rope_theta"),
        _config_case("rope-scaling-string", _cfg("rope_scaling", "linear"), "rope_scaling"),
        _config_case("rope-scaling-yarn", _cfg("rope_scaling", {"rope_type": "yarn",
                                                                "factor": 4.0}), "yarn"),
        _config_case("rope-factor-zero", _cfg("rope_scaling", {"rope_type": "linear",
                                                               "factor": 0}), "factor"),
        _config_case("context-zero", _cfg("max_position_embeddings", 0),
                     "max_position_embeddings"),
        _config_case("context-huge", _cfg("max_position_embeddings", 10**15),
                     "max_position_embeddings"),
        _config_case("vocab-mismatch", _cfg("vocab_size", 1000), "shape"),
        _config_case("model-type-unknown", _cfg("model_type", "gpt9"), "gpt9"),
        _config_case("model-type-list", _cfg("model_type", ["llama"]), "model_type"),
        _config_case("model-type-escape", _cfg("model_type", "\x1b]0;pwned\x07"),
                     "model_type"),
        _config_case("tie-string", _cfg("tie_word_embeddings", "no"), "tie_word_embeddings"),
        _config_case("not-json", lambda c: "{hidden_size: 64", "config.json"),
        _config_case("array", lambda c: "[1, 2, 3]", "config.json"),
        _config_case("deeply-nested", lambda c: "[" * 100000 + "]" * 100000, "config.json"),
        _config_case("empty", lambda c: "", "config.json"),
        _config_case("binary", lambda c: b"\xff\x00\x01", "config.json"),
    ]
    gemma = {"query-scalar-zero": ("query_pre_attn_scalar", 0),
             "query-scalar-negative": ("query_pre_attn_scalar", -16),
             "window-negative": ("sliding_window", -4),
             "window-string": ("sliding_window", "4"),
             "pattern-zero": ("sliding_window_pattern", 0),
             "pattern-string": ("sliding_window_pattern", "6")}
    for name, (key, value) in gemma.items():
        def build(bases, folder, key=key, value=value):
            target = write_hf_folder(folder / "hf", "gemma3")
            config = json.loads((target / "config.json").read_text())
            config[key] = value
            (target / "config.json").write_text(json.dumps(config))
            return ["-m", str(target), *GEN]
        cases.append(Case(f"hf-gemma-{name}", "hf", "cli", build, "error", key))
    cases += _tokenizer_cases() + _index_cases()
    return cases


def _file_case(name: str, category: str, edit: Callable[[Path], None], cause: str,
               expect: str = "error") -> Case:
    def build(bases: Bases, folder: Path) -> list[str]:
        target = _hf_copy(bases, folder)
        edit(target)
        return ["-m", str(target), *GEN]
    return Case(name, category, "cli", build, expect, cause)


def _write(name: str, text: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_text(text)


def _tokenizer_edit(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        tokenizer = json.loads((folder / "tokenizer.json").read_text())
        edit(tokenizer)
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    return apply


def _tokenizer_cases() -> list[Case]:
    return [
        _file_case("hf-tokenizer-missing", "hf", lambda f: (f / "tokenizer.json").unlink(),
                   "tokenizer.json"),
        _file_case("hf-tokenizer-garbage", "hf", _write("tokenizer.json", "{not json"),
                   "tokenizer"),
        _file_case("hf-tokenizer-deep", "hf", _write("tokenizer.json", "[" * 100000),
                   "tokenizer"),
        _file_case("hf-tokenizer-id-huge", "hf", _tokenizer_edit(
            lambda t: t["model"]["vocab"].__setitem__("a", 2**40)), "tokenizer"),
        _file_case("hf-tokenizer-model-unknown", "hf", _tokenizer_edit(
            lambda t: t.__setitem__("model", {"type": "Nope"})), "tokenizer"),
        _file_case("hf-tokenizer-unk-missing", "hf", _tokenizer_edit(
            lambda t: t["model"].__setitem__("unk_token", "zzz")), "tokenizer"),
        _file_case("hf-tokenizer-added-id-huge", "hf", _tokenizer_edit(
            lambda t: t.__setitem__("added_tokens", [{"id": 2**40, "content": "x"}])),
            "tokenizer"),
        _file_case("hf-tokenizer-config-array", "hf", _write("tokenizer_config.json", "[]"),
                   "tokenizer_config.json"),
        _file_case("hf-bos-token-int", "hf", _write("tokenizer_config.json",
                                                    '{"bos_token": 5}'), "bos_token"),
        _file_case("hf-eos-id-huge", "hf", _write("generation_config.json",
                                                  '{"eos_token_id": 99999999}'),
                   "eos_token_id"),
        _file_case("hf-eos-id-string", "hf", _write("generation_config.json",
                                                    '{"eos_token_id": "two"}'),
                   "eos_token_id"),
        _file_case("hf-eos-id-negative", "hf", _write("generation_config.json",
                                                      '{"eos_token_id": [-1]}'),
                   "eos_token_id"),
        _file_case("hf-template-hostile", "hf", _write(
            "tokenizer_config.json", json.dumps({"chat_template": "{{ 'x' * 10**12 }}"})),
            "chat template"),
        _file_case("hf-template-not-string", "hf", _write(
            "tokenizer_config.json", json.dumps({"chat_template": {"a": 1}})),
            "chat_template"),
    ]


def _index_cases() -> list[Case]:
    def index(weight_map) -> Callable[[Path], None]:
        return _write("model.safetensors.index.json", json.dumps({"weight_map": weight_map}))
    return [
        _file_case("hf-index-escape", "hf", index({"a": "../model.safetensors"}), "outside"),
        _file_case("hf-index-absolute", "hf", index({"a": "/etc/passwd"}), "outside"),
        _file_case("hf-index-missing-shard", "hf", index({"a": "nope.safetensors"}), "shard"),
        _file_case("hf-index-not-dict", "hf", index(["model.safetensors"]), "weight_map"),
        _file_case("hf-index-int-name", "hf", index({"a": 5}), "outside"),
        _file_case("hf-no-weights", "hf", lambda f: (f / "model.safetensors").unlink(),
                   "safetensors"),
    ]


# --- safetensors ------------------------------------------------------------------------------

def _st_case(name: str, edit: Callable[[dict, bytes], tuple[dict | bytes, bytes]],
             cause: str) -> Case:
    def build(bases: Bases, folder: Path) -> list[str]:
        target = _hf_copy(bases, folder)
        raw = (target / "model.safetensors").read_bytes()
        (n,) = struct.unpack_from("<Q", raw, 0)
        header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
        header, data = edit(header, data)
        text = header if isinstance(header, bytes) else json.dumps(header).encode()
        (target / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data)
        return ["-m", str(target), *GEN]
    return Case(f"safetensors-{name}", "safetensors", "cli", build, "error", cause)


_EMBED = "model.embed_tokens.weight"


def _entry(field: str, value) -> Callable[[dict, bytes], tuple[dict, bytes]]:
    def edit(header: dict, data: bytes) -> tuple[dict, bytes]:
        header[_EMBED][field] = value
        return header, data
    return edit


def safetensors_cases() -> list[Case]:
    def raw_prefix(prefix: bytes) -> Case:
        def build(bases, folder):
            target = _hf_copy(bases, folder)
            (target / "model.safetensors").write_bytes(prefix)
            return ["-m", str(target), *GEN]
        return build
    cases = [
        _st_case("dtype-i64", _entry("dtype", "I64"), "dtype"),
        _st_case("dtype-int", _entry("dtype", 7), "dtype"),
        _st_case("shape-negative", _entry("shape", [-309, -64]), "shape"),
        _st_case("shape-wraps", _entry("shape", [2**62, 2**62, 16]), "shape"),
        _st_case("shape-string", _entry("shape", "309x64"), "shape"),
        _st_case("shape-float", _entry("shape", [309.5, 64]), "shape"),
        _st_case("offsets-reversed", _entry("data_offsets", [100, 0]), "byte range"),
        _st_case("offsets-beyond", _entry("data_offsets", [0, 1 << 40]), "byte range"),
        _st_case("offsets-negative", _entry("data_offsets", [-8, 79096]), "data_offsets"),
        _st_case("offsets-three", _entry("data_offsets", [0, 1, 2]), "malformed"),
        _st_case("entry-not-dict", lambda h, d: ({**h, _EMBED: [1, 2]}, d), "malformed"),
        _st_case("header-array", lambda h, d: (b"[]", d), "JSON object"),
        _st_case("header-not-json", lambda h, d: (b"{\"a\": ", d), "header"),
        _st_case("header-deep", lambda h, d: (b"[" * 100000 + b"]" * 100000, d), "header"),
        _st_case("data-truncated", lambda h, d: (h, d[:len(d) // 2]), "byte range"),
        _st_case("tensor-missing", lambda h, d: ({k: v for k, v in h.items()
                                                 if k != "model.norm.weight"}, d), "norm"),
        _st_case("nan-weights", lambda h, d: (h, _nan_fill(h, d)), _EMBED.split(".")[1]),
        # findings of the fuzzer (fuzz_parsers.py), kept as cases
        _st_case("dtype-list", _entry("dtype", ["F32"]), "dtype"),
        _st_case("shape-huge-int", _entry("shape", [10**30, 64]), "shape"),
        _st_case("offsets-float", _entry("data_offsets", [0.0, 1e30]), "data_offsets"),
        Case("safetensors-declared-huge-sparse", "safetensors", "cli", _huge_tensor, "error",
             "shape"),
        _st_case("metadata-not-dict", lambda h, d: ({**h, "__metadata__": [1]}, d),
                 "__metadata__"),
    ]
    cases += [
        Case("safetensors-header-length-huge", "safetensors", "cli",
             raw_prefix(struct.pack("<Q", 1 << 62) + b"{}"), "error", "header length"),
        Case("safetensors-empty", "safetensors", "cli", raw_prefix(b""), "error", "too short"),
    ]
    return cases


def _huge_tensor(bases: Bases, folder: Path) -> list[str]:
    """The embedding declares 2**20 x 4096 floats (16 GiB) in a file that is mostly a hole:
    refused from the header, before any byte is read."""
    target = _hf_copy(bases, folder)
    raw = (target / "model.safetensors").read_bytes()
    (n,) = struct.unpack_from("<Q", raw, 0)
    header = json.loads(raw[8:8 + n])
    size = (1 << 20) * 4096 * 4
    header[_EMBED] = {"dtype": "F32", "shape": [1 << 20, 4096], "data_offsets": [0, size]}
    for name, info in header.items():
        if name != _EMBED and name != "__metadata__":
            begin, end = info["data_offsets"]
            info["data_offsets"] = [begin + size, end + size]
    text = json.dumps(header).encode()
    path = target / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text)
    _truncate(path, 8 + len(text) + size + len(raw))
    return ["-m", str(target), *GEN]


def _nan_fill(header: dict, data: bytes) -> bytes:
    begin, end = header[_EMBED]["data_offsets"]
    values = bytearray(data)
    values[begin:begin + 64] = np.full(16, np.nan, np.float32).tobytes()
    return bytes(values)


# --- flash stores -----------------------------------------------------------------------------

def _store_copy(bases: Bases, folder: Path) -> Path:
    target = folder / "store"
    shutil.copytree(bases.store, target)
    return target


def _manifest_case(name: str, edit: Callable[[dict], object], cause: str,
                   extra: list[str] = ()) -> Case:
    def build(bases: Bases, folder: Path) -> list[str]:
        target = _store_copy(bases, folder)
        manifest = json.loads((target / "manifest.json").read_text())
        replaced = edit(manifest)
        text = replaced if isinstance(replaced, str) else json.dumps(manifest)
        (target / "manifest.json").write_text(text)
        return ["-m", str(target), *GEN, *extra]
    return Case(f"store-manifest-{name}", "store", "cli", build, "error", cause)


def _json_with(value: dict, key: str, literal: str) -> str:
    """`value` as JSON with every `key`'s value replaced by `literal` (NaN, Infinity: JSON
    that Python's parser accepts and json.dumps would not write for us)."""
    return re.sub(rf'"{key}": [^,}}]*', f'"{key}": {literal}', json.dumps(value))


def _tensor(name: str, field: str, value) -> Callable[[dict], None]:
    return lambda m: m["tensors"][name].__setitem__(field, value)


def _config_field(field: str, value) -> Callable[[dict], None]:
    return lambda m: m["config"].__setitem__(field, value)


def store_cases() -> list[Case]:
    ffn = "layers.0.ffn"
    cases = [
        _manifest_case("not-json", lambda m: "{", "manifest.json"),
        _manifest_case("array", lambda m: "[]", "manifest"),
        _manifest_case("deep", lambda m: "[" * 100000 + "]" * 100000, "manifest.json"),
        _manifest_case("format", lambda m: m.__setitem__("format", "other"), "manifest"),
        _manifest_case("version-3", lambda m: m.__setitem__("version", 3), "newer"),
        _manifest_case("version-0", lambda m: m.__setitem__("version", 0), "version"),
        _manifest_case("version-bool", lambda m: m.__setitem__("version", True), "version"),
        _manifest_case("version-string", lambda m: m.__setitem__("version", "1"), "version"),
        _manifest_case("codec-unknown", lambda m: m.__setitem__("codec", "int3"), "codec"),
        _manifest_case("codec-list", lambda m: m.__setitem__("codec", ["int8"]), "codec"),
        _manifest_case("config-missing", lambda m: m.pop("config"), "config"),
        _manifest_case("config-list", lambda m: m.__setitem__("config", []), "config"),
        _manifest_case("config-extra", _config_field("evil", 1), "config"),
        _manifest_case("config-layers-string", _config_field("n_layers", "7"), "n_layers"),
        _manifest_case("config-layers-bool", _config_field("n_layers", True), "n_layers"),
        _manifest_case("config-layers-largest", _config_field("n_layers", (1 << 24) - 1),
                       "layers"),
        _manifest_case("config-eps-nan", lambda m: _json_with(m, "norm_eps", "NaN"),
                       "norm_eps"),
        _manifest_case("config-eps-inf", lambda m: _json_with(m, "norm_eps", "Infinity"),
                       "norm_eps"),
        _manifest_case("config-window-negative", _config_field("sliding_window", -4),
                       "sliding_window"),
        _manifest_case("config-window-float", _config_field("sliding_window", 4.5),
                       "sliding_window"),
        _manifest_case("config-rope-string", _config_field("rope_theta", "1e6"), "rope_theta"),
        _manifest_case("config-scale-negative", _config_field("attn_scale", -1.0),
                       "attn_scale"),
        _manifest_case("config-arch-unknown", _config_field("arch", "gpt9"), "gpt9"),
        _manifest_case("config-tie-string", _config_field("tie_embeddings", "yes"),
                       "tie_embeddings"),
        _manifest_case("config-pattern-negative", _config_field("sliding_window_pattern", -1),
                       "sliding_window_pattern"),
        _manifest_case("files-list", lambda m: m.__setitem__("files", ["weights.bin"]),
                       "files"),
        _manifest_case("files-escape", lambda m: m["files"].__setitem__(
            "../store2/weights.bin", m["files"]["weights.bin"]), "plain name"),
        _manifest_case("files-absolute", lambda m: m["files"].__setitem__(
            "/etc/passwd", {"size": 1}), "plain name"),
        _manifest_case("files-self", lambda m: m["files"].__setitem__(
            "manifest.json", {"size": 1}), "plain name"),
        _manifest_case("files-size-string", lambda m: m["files"]["weights.bin"].__setitem__(
            "size", "big"), "weights.bin"),
        _manifest_case("files-info-list", lambda m: m["files"].__setitem__(
            "weights.bin", [1]), "weights.bin"),
        _manifest_case("tensors-list", lambda m: m.__setitem__("tensors", []), "tensor"),
        _manifest_case("tensor-missing", lambda m: m["tensors"].pop(ffn), ffn),
        _manifest_case("tensor-not-dict", lambda m: m["tensors"].__setitem__(ffn, 5), ffn),
        _manifest_case("tensor-offset-negative", _tensor(ffn, "offset", -4096), ffn),
        _manifest_case("tensor-offset-string", _tensor(ffn, "offset", "0"), ffn),
        _manifest_case("tensor-offset-float", _tensor(ffn, "offset", 4096.5), ffn),
        _manifest_case("tensor-offset-misaligned", _tensor(ffn, "offset", 4097), ffn),
        _manifest_case("tensor-offset-beyond", _tensor(ffn, "offset", 1 << 50), ffn),
        _manifest_case("tensor-rows", _tensor(ffn, "rows", 127), ffn),
        _manifest_case("tensor-codec", _tensor(ffn, "codec", "f32"), ffn),
        _manifest_case("tensor-row-bytes", _tensor(ffn, "row_nbytes", 1), ffn),
        _manifest_case("tensor-file-unlisted", _tensor(ffn, "file", "other.bin"), ffn),
        _manifest_case("tensor-file-list", _tensor(ffn, "file", ["weights.bin"]), ffn),
        _manifest_case("tokenizer-kind", lambda m: m["tokenizer"].__setitem__("kind", "sp"),
                       "tokenizer"),
        _manifest_case("tokenizer-files-string", lambda m: m["tokenizer"].__setitem__(
            "files", "tokenizer.gguf"), "tokenizer"),
        _manifest_case("tokenizer-list", lambda m: m.__setitem__("tokenizer", [1]),
                       "tokenizer"),
        _manifest_case("head-proxy-garbage", lambda m: m.__setitem__("head_proxy", "x"),
                       "proxy"),
        _manifest_case("sparsity-garbage", lambda m: m.__setitem__("sparsity", [1]),
                       "sparsity"),
        _manifest_case("quality-garbage", lambda m: m.__setitem__("quality", {"x": "y"}),
                       "quality"),
        _manifest_case("template-hostile", lambda m: m.__setitem__(
            "chat_template", "{{ 'x' * 10**12 }}"), "chat template"),
        _manifest_case("template-not-string", lambda m: m.__setitem__("chat_template", [1]),
                       "chat_template"),
    ]

    def damaged(name: str, edit: Callable[[Path], None], cause: str,
                extra: list[str] = ()) -> Case:
        def build(bases, folder):
            target = _store_copy(bases, folder)
            edit(target)
            return ["-m", str(target), *GEN, *extra]
        return Case(f"store-{name}", "store", "cli", build, "error", cause)

    def flip(target: Path) -> None:
        with open(target / "weights.bin", "r+b") as f:
            f.seek(5000)
            byte = f.read(1)
            f.seek(5000)
            f.write(bytes([byte[0] ^ 0xFF]))

    def nan_vector(target: Path) -> None:
        manifest = json.loads((target / "manifest.json").read_text())
        entry = manifest["tensors"]["final_norm"]
        with open(target / "weights.bin", "r+b") as f:
            f.seek(entry["offset"])
            f.write(np.full(4, np.nan, np.float32).tobytes())

    def outside_link(target: Path) -> None:
        outside = target.parent / "elsewhere.bin"
        shutil.move(target / "weights.bin", outside)
        (target / "weights.bin").symlink_to(outside)

    cases += [
        damaged("weights-truncated", lambda t: _truncate(t / "weights.bin", 4096),
                "weights.bin"),
        damaged("weights-missing", lambda t: (t / "weights.bin").unlink(), "weights.bin"),
        damaged("weights-directory", lambda t: ((t / "weights.bin").unlink(),
                                                (t / "weights.bin").mkdir()), "weights.bin"),
        damaged("weights-flipped-verify", flip, "checksum", ["--verify"]),
        damaged("weights-nan-norm", nan_vector, "final_norm"),
        damaged("weights-outside-link", outside_link, "weights.bin"),
        damaged("tokenizer-missing", lambda t: (t / "tokenizer.gguf").unlink(),
                "tokenizer.gguf"),
        damaged("tokenizer-garbage", lambda t: (t / "tokenizer.gguf").write_bytes(b"GGUF\3"),
                "tokenizer.gguf"),
        damaged("manifest-huge", lambda t: _truncate(t / "manifest.json", 65 << 20),
                "manifest.json"),
        damaged("manifest-directory", lambda t: ((t / "manifest.json").unlink(),
                                                 (t / "manifest.json").mkdir()),
                "manifest.json"),
    ]
    return cases


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


# --- files and the OS ---------------------------------------------------------------------------

def _store_tokenizer_short(bases: Bases, folder: Path) -> list[str]:
    """A store whose tokenizer.gguf holds fewer tokens than its model (checksums updated):
    llama.cpp aborts on the first id past its vocabulary."""
    target = _store_copy(bases, folder)
    meta = base_metadata()
    tokens = meta["tokenizer.ggml.tokens"][0][:-30]
    meta["tokenizer.ggml.tokens"] = (tokens, T.ARRAY, T.STRING)
    meta["tokenizer.ggml.scores"] = (meta["tokenizer.ggml.scores"][0][:-30], T.ARRAY, T.FLOAT32)
    meta["tokenizer.ggml.token_type"] = (meta["tokenizer.ggml.token_type"][0][:-30], T.ARRAY,
                                         T.INT32)
    write_gguf(target / "tokenizer.gguf", meta, weights={})
    _relist(target, "tokenizer.gguf")
    return ["-m", str(target), *GEN, "--verify"]


def _relist(store: Path, name: str) -> None:
    """Record `name`'s new size and checksum in the store's manifest (a careful attacker)."""
    manifest = json.loads((store / "manifest.json").read_text())
    data = (store / name).read_bytes()
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (store / "manifest.json").write_text(json.dumps(manifest))


def _duplicate_key(data: bytearray) -> bytes:
    return bytes(data).replace(b"tokenizer.ggml.pre", b"gemma3.block_count", 1)


def _long_name(bases: Bases, folder: Path) -> list[str]:
    target = folder / ("m" * 240 + ".gguf")
    shutil.copy(bases.gguf, target)
    return ["-m", str(target), *GEN]


def _threads_code(store: Path) -> str:
    return (f"import threading, flashinfer_ondevice as fi\n"
            f"m = fi.load({str(store)!r}, threads=1)\n"
            "first = m.stream([1, 5, 6], max_tokens=5, temperature=0)\n"
            "next(first)  # a generation in progress in this thread\n"
            "errors = []\n"
            "def other():\n"
            "    try:\n"
            "        m.generate([1, 5, 6], max_tokens=2)\n"
            "    except fi.FlashInferError as exc:\n"
            "        errors.append(exc)\n"
            "t = threading.Thread(target=other); t.start(); t.join()\n"
            "list(first)\n"
            "raise errors[0]\n")


def files_cases() -> list[Case]:
    def args(*a: str) -> Build:
        return lambda bases, folder: [x.format(gguf=bases.gguf, folder=folder,
                                               store=bases.store) for x in a]

    def partial_store(bases: Bases, folder: Path) -> list[str]:
        target = folder / ".store.partial-999999"
        shutil.copytree(bases.store, target)
        (target / UNFINISHED).write_text("")  # what a killed convert leaves (convert.py)
        return ["-m", str(target), *GEN]

    def unwritable_output(bases, folder):
        (folder / "file").write_text("")
        return ["convert", str(bases.gguf), "-o", str(folder / "file" / "store")]

    def wildcard_output(bases, folder):
        (folder / ".other.partial-1").mkdir()
        (folder / ".other.partial-1" / "keep").write_text("x")
        return ["convert", str(bases.gguf), "-o", str(folder / "*")]

    def lean(bases: Bases, folder: Path) -> list[str]:
        target = _store_copy(bases, folder)
        _truncate(target / "pieces.idx", 100)
        _relist(target, "pieces.idx")
        return ["-m", str(target), *GEN, "--memory-budget", "50%"]

    def models_dir_file(bases: Bases, folder: Path) -> list[str]:
        (folder / "not-a-folder").write_text("")
        return ["-m", str(bases.gguf), *GEN]

    return [
        Case("files-store-tokenizer-short", "files", "cli", _store_tokenizer_short, "error",
             "tokenizer.gguf holds"),
        Case("files-store-pieces-short", "files", "cli", lean, "error", "piece table"),
        Case("files-source-name-long-ok", "files", "cli", _long_name, "ok", ""),
        Case("files-models-dir-is-a-file", "files", "cli", models_dir_file, "error",
             "not-a-folder", env=(("FLASHINFER_MODELS_DIR", "{folder}/not-a-folder"),)),
        Case("files-threads-garbage-env", "files", "cli", args("-m", "{store}", "-p", "abc",
                                                                "-n", "2"),
             "error", "threads", env=(("FLASHINFER_THREADS", "abc"),)),
        Case("files-profile-out-under-file", "files", "cli", lambda b, f: (
            (f / "x").write_text(""),
            ["profile", "-m", str(b.gguf), "--plan-only", "--out", str(f / "x" / "p")])[1],
            "error", "x"),
        Case("files-prompt-beyond-context", "files", "cli", lambda b, f: (
            (f / "p.txt").write_text("abc " * 300_000),
            ["-m", str(b.store), "-f", str(f / "p.txt"), "-n", "2"])[1], "error", "context"),
        Case("files-eval-default-context-ok", "files", "cli", lambda b, f: (
            (f / "e.txt").write_text("abc def ghi jkl mno pqr stu vwx yz " * 20),
            ["eval", "-m", str(b.store), "-f", str(f / "e.txt")])[1], "ok", "perplexity"),
        Case("files-model-fifo", "files", "cli", _fifo_model, "error", "neither"),
        Case("files-model-missing", "files", "cli", args("-m", "{folder}/nope.gguf", *GEN),
             "error", "not found"),
        Case("files-model-dev-zero", "files", "cli", args("-m", "/dev/zero", *GEN), "error",
             "/dev/zero"),
        Case("files-model-empty-folder", "files", "cli",
             lambda b, f: ["-m", str(f), *GEN], "error", "config.json"),
        Case("files-prompt-file-missing", "files", "cli",
             args("-m", "{store}", "-f", "{folder}/nope.txt", "-n", "2"), "error", "nope.txt"),
        Case("files-prompt-file-directory", "files", "cli",
             args("-m", "{store}", "-f", "{folder}", "-n", "2"), "error", "prompt file"),
        Case("files-prompt-file-binary", "files", "cli", _binary_prompt, "error",
             "prompt file"),
        Case("files-prompt-file-huge", "files", "cli", _huge_prompt, "error", "limit"),
        Case("files-stdin-closed", "files", "cli", args("-m", "{store}", "-p", "-", "-n", "2"),
             "error", "standard input", stdin=CLOSED),
        Case("files-stdin-empty", "files", "cli", args("-m", "{store}", "-p", "-", "-n", "2"),
             "error", "empty", stdin=""),
        Case("files-stdin-ok", "files", "cli", args("-m", "{store}", "-p", "-", "-n", "2",
                                                    "--temp", "0"), "ok", "", stdin="abc"),
        Case("files-convert-unwritable", "files", "cli", unwritable_output, "error",
             "cannot write"),
        Case("files-convert-wildcard-keeps-others", "files", "cli", wildcard_output, "ok",
             ""),
        Case("files-partial-store", "files", "cli", partial_store, "error", "partial"),
        Case("files-eval-text-missing", "files", "cli",
             args("eval", "-m", "{store}", "-f", "{folder}/none.txt"), "error", "none.txt"),
        Case("files-eval-text-empty", "files", "cli", _empty_eval, "error",
             "fewer than 2 tokens"),
        Case("files-convert-store-again", "files", "cli", args("convert", "{store}"), "error",
             "already a flash store"),
    ]


def _fifo_model(bases: Bases, folder: Path) -> list[str]:
    os.mkfifo(folder / "m.gguf")  # opening it for reading would wait for a writer forever
    return ["-m", str(folder / "m.gguf"), *GEN]


def _binary_prompt(bases: Bases, folder: Path) -> list[str]:
    (folder / "p.bin").write_bytes(b"\xff\xfe\x00bad")
    return ["-m", str(bases.store), "-f", str(folder / "p.bin"), "-n", "2"]


def _huge_prompt(bases: Bases, folder: Path) -> list[str]:
    _truncate_new(folder / "p.txt", 80 << 20)  # sparse: zeros, valid UTF-8
    return ["-m", str(bases.store), "-f", str(folder / "p.txt"), "-n", "2"]


def _truncate_new(path: Path, size: int) -> None:
    path.touch()
    _truncate(path, size)


def _empty_eval(bases: Bases, folder: Path) -> list[str]:
    (folder / "e.txt").write_text("")
    return ["eval", "-m", str(bases.store), "-f", str(folder / "e.txt"), "-c", "64"]


# --- flags ------------------------------------------------------------------------------------

def cli_cases() -> list[Case]:
    def flags(name: str, extra: list[str], cause: str, expect: str = "error",
              command: str | None = None) -> Case:
        def build(bases, folder):
            head = [command] if command else []
            return [*head, "-m", str(bases.store), *(GEN if not command else []), *extra]
        return Case(f"cli-{name}", "cli", "cli", build, expect, cause)

    return [
        flags("temp-nan", ["--temp", "nan"], "temp"),
        flags("temp-inf", ["--temp", "inf"], "temp"),
        flags("temp-negative", ["--temp", "-1"], "temp"),
        flags("top-p-nan", ["--top-p", "nan"], "top-p"),
        flags("top-p-two", ["--top-p", "2"], "top-p"),
        flags("min-p-nan", ["--min-p", "nan"], "min-p"),
        flags("repeat-zero", ["--repeat-penalty", "0"], "repeat-penalty"),
        flags("repeat-inf", ["--repeat-penalty", "inf"], "repeat-penalty"),
        flags("seed-negative", ["--seed", "-1"], "seed"),
        flags("seed-huge", ["--seed", str(1 << 70)], "seed"),
        flags("tokens-zero", ["-n", "0"], "max-tokens"),
        flags("ctx-zero", ["-c", "0"], "ctx-size"),
        flags("ctx-beyond-model", ["-c", "100000"], "context"),
        flags("threads-zero", ["-t", "0"], "threads"),
        flags("budget-garbage", ["--memory-budget", "lots"], "memory budget"),
        flags("budget-negative", ["--memory-budget", "-5MB"], "memory budget"),
        flags("budget-nan", ["--memory-budget", "nan%"], "memory budget"),
        flags("budget-huge-number", ["--memory-budget", "1e400MB"], "memory budget"),
        flags("budget-tiny", ["--memory-budget", "1"], "budget"),
        flags("codec-unknown", ["--codec", "pal9"], "codec"),
        flags("codec-empty-group", ["--codec", "int8,embed="], "codec"),
        flags("sparsity-nan", ["--sparsity", "nan"], "sparsity"),
        flags("window-zero", ["--window", "0"], "window"),
        flags("backend-unknown", ["--backend", "tpu"], "backend"),
        flags("stop-empty", ["--stop", ""], "stop"),
        flags("prompt-empty", ["-p", ""], "empty"),
        flags("prompt-too-long", ["-p", "a " * 400], "context"),
        flags("eval-ctx-one", ["-f", "/dev/null", "-c", "1"], "ctx-size", command="eval"),
        flags("eval-max-tokens-zero", ["-f", "/dev/null", "--max-tokens", "0"], "max-tokens",
              command="eval"),
        flags("profile-budgets-empty", ["--budgets", ","], "budget", command="profile"),
        flags("profile-budgets-garbage", ["--budgets", "abc"], "budget", command="profile"),
        flags("profile-settings-unknown", ["--settings", "turbo"], "turbo",
              command="profile"),
        Case("cli-convert-bits-low", "cli", "cli",
             lambda b, f: ["convert", str(b.gguf), "--bits", "0.5"], "error", "bits"),
        Case("cli-convert-target-garbage", "cli", "cli",
             lambda b, f: ["convert", str(b.gguf), "--target-size", "huge"], "error",
             "target-size"),
        Case("cli-convert-target-tiny", "cli", "cli",
             lambda b, f: ["convert", str(b.gguf), "--target-size", "1"], "error", "fits"),
        Case("cli-unknown-command-is-prompt", "cli", "cli",
             lambda b, f: ["-m", str(b.store), "--no-such-flag"], "error", "no-such-flag"),
        Case("cli-ok-generate", "cli", "cli", lambda b, f: ["-m", str(b.store), *GEN], "ok",
             ""),
    ]


# --- the Python API ---------------------------------------------------------------------------

def api_cases() -> list[Case]:
    def api(name: str, code: str, cause: str, expect: str = "error") -> Case:
        def build(bases, folder):
            prelude = (f"import flashinfer_ondevice as fi, math\n"
                       f"m = fi.load({str(bases.store)!r}, threads=1)\n")
            return [prelude + code]
        return Case(f"api-{name}", "api", "api", build, expect, cause)

    def bare(name: str, code: str, cause: str) -> Case:
        def build(bases, folder):
            return ["import flashinfer_ondevice as fi\n"
                    + code.format(store=str(bases.store), folder=str(folder))]
        return Case(f"api-{name}", "api", "api", build, "error", cause)

    gen = "m.generate('abc', max_tokens=2, {})"
    return [
        api("temperature-nan", gen.format("temperature=math.nan"), "temperature"),
        api("temperature-inf", gen.format("temperature=math.inf"), "temperature"),
        api("temperature-string", gen.format("temperature='hot'"), "temperature"),
        api("top-p-nan", gen.format("top_p=math.nan"), "top_p"),
        api("top-p-zero", gen.format("top_p=0.0"), "top_p"),
        api("top-p-negative", gen.format("top_p=-0.5"), "top_p"),
        api("top-k-negative", gen.format("top_k=-3"), "top_k"),
        api("top-k-float", gen.format("top_k=2.5"), "top_k"),
        api("min-p-nan", gen.format("min_p=math.nan"), "min_p"),
        api("min-p-two", gen.format("min_p=2.0"), "min_p"),
        api("repetition-zero", gen.format("repetition_penalty=0.0"), "repetition_penalty"),
        api("repetition-nan", gen.format("repetition_penalty=math.nan"), "repetition_penalty"),
        api("repetition-negative", gen.format("repetition_penalty=-1.0"),
            "repetition_penalty"),
        api("seed-negative", gen.format("seed=-1"), "seed"),
        api("seed-float", gen.format("seed=1.5"), "seed"),
        api("max-tokens-zero", gen.format("max_tokens=0").replace("max_tokens=2, ", ""),
            "max_tokens"),
        api("max-tokens-string", "m.generate('abc', max_tokens='5')", "max_tokens"),
        api("stop-string", gen.format("stop='x'"), "stop"),
        api("stop-none-element", gen.format("stop=[None]"), "stop"),
        api("prompt-none", "m.generate(None, max_tokens=2)", "prompt"),
        api("prompt-empty-list", "m.generate([], max_tokens=2)", "empty"),
        api("prompt-negative-id", "m.generate([1, -5], max_tokens=2)", "-5"),
        api("prompt-huge-id", "m.generate([1, 10**9], max_tokens=2)", "1000000000"),
        api("prompt-float-id", "m.generate([1, 2.5], max_tokens=2)", "token id"),
        api("prompt-string-ids", "m.generate(['a'], max_tokens=2)", "token id"),
        api("prompt-bytes", "m.generate(b'abc', max_tokens=2)", "prompt"),
        api("detokenize-out-of-range", "print(m.detokenize([1, 10**6]))", "1000000"),
        api("detokenize-negative", "print(m.detokenize([-1]))", "-1"),
        api("detokenize-string", "print(m.detokenize(['x']))", "token id"),
        api("tokenize-none", "m.tokenize(None)", "text"),
        api("tokenize-bytes", "m.tokenize(b'abc')", "text"),
        api("logits-empty", "m.logits([])", "empty"),
        api("logits-too-long", "m.logits([1] * 5000)", "context"),
        api("logits-full-context-ok", "print(m.logits([1] * 256).shape)", "(256, 311)",
            expect="ok"),
        api("tokenize-lone-surrogate", "m.tokenize('a\\ud800b')", "surrogate"),
        api("logits-zero-dim-array", "import numpy as np; m.logits(np.array(5))", "prompt"),
        api("use-after-close", "m.close(); m.generate([1, 5], max_tokens=2)", "closed"),
        api("tokenize-add-special-string", "m.tokenize('abc', add_special='no')",
            "add_special"),
        Case("api-two-threads-one-model", "api", "api",
             lambda b, f: [_threads_code(b.store)], "error", "another thread"),
        bare("load-verify-string", "fi.load({store!r}, verify='no')", "verify"),
        bare("load-path-nul", "fi.load('a\\x00b')", "NUL"),
        api("chat-messages-string", "m.apply_chat_template('hi')", "messages"),
        api("chat-role-int", "m.apply_chat_template([{'role': 1, 'content': 'x'}])",
            "messages"),
        bare("load-missing", "fi.load('{folder}/none.gguf')", "not found"),
        bare("load-int-path", "fi.load(123)", "path"),
        bare("load-backend", "fi.load({store!r}, backend='tpu')", "backend"),
        bare("load-ctx-zero", "fi.load({store!r}, ctx_size=0)", "ctx_size"),
        bare("load-ctx-string", "fi.load({store!r}, ctx_size='big')", "ctx_size"),
        bare("load-threads-string", "fi.load({store!r}, threads='2')", "threads"),
        bare("load-budget-negative", "fi.load({store!r}, memory_budget=-1)", "memory budget"),
        bare("load-budget-nan", "fi.load({store!r}, memory_budget=float('nan'))",
             "memory budget"),
        bare("load-codec-none", "fi.load({store!r}, codec=None)", "codec"),
        bare("load-cache-type", "fi.load({store!r}, cache_type='q2')", "cache"),
        bare("load-head", "fi.load({store!r}, head='fast')", "head"),
        bare("load-quality", "fi.load({store!r}, quality='best')", "quality"),
        bare("load-selector", "fi.load({store!r}, selector='random')", "selector"),
        bare("load-window-negative", "fi.load({store!r}, window=-1)", "window"),
    ]


def all_cases() -> list[Case]:
    cases = (gguf_cases() + vocab_cases() + template_cases() + hf_cases()
             + safetensors_cases() + store_cases() + files_cases() + cli_cases() + api_cases())
    names = [c.name for c in cases]
    duplicates = {n for n in names if names.count(n) > 1}
    assert not duplicates, f"duplicate case names {duplicates}"
    return cases


def make_bases(folder: Path) -> Bases:
    """Write the well-formed inputs: a tiny gemma3 GGUF, a llama HF folder, and a store."""
    from flashinfer_ondevice.build.convert import convert

    folder.mkdir(parents=True, exist_ok=True)
    gguf_path = write_gguf(folder / "tiny-gemma3.gguf")
    hf = write_hf_folder(folder / "tiny-llama-hf", "llama")
    store = folder / "tiny-gemma3-store"
    convert(gguf_path, store, "int8")
    return Bases(gguf_path, hf, store)
