"""Validate a GGUF vocabulary before llama.cpp sees it.

llama.cpp trusts the tokenizer metadata it loads: two tokens with the same text, a merge
without a space, an array shorter than the token list or a special id outside the vocabulary
make it assert and abort the whole process. So every tokenizer field it reads is checked here
first (types, lengths, ranges, uniqueness), on the raw bytes llama.cpp would compare, and a
problem is a one-line `ModelFileError` naming the key. The child-process check in
`llama_backend` stays behind this as a second line of defence.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ModelFileError, UnsupportedModelError
from ..values import describe, printable
from .gguf_header import GGUFHeader, LazyArray, read_header

TOKENIZER_MODELS = ("llama", "gpt2")  # SentencePiece-style and byte-level BPE
MAX_TOKENS = 1 << 22
MAX_VOCAB_BYTES = 256 << 20  # of the token or merge strings (Gemma 3's tokens: ~4 MB)
_TOKEN_TYPES = range(0, 7)  # llama_token_type: undefined .. byte
_BYTE = 6
_FLOAT_TYPES, _INT_TYPES, _STRING_TYPE = (6, 12), (0, 1, 2, 3, 4, 5, 10, 11), 8
_checked: dict[tuple, int] = {}  # (path, size, mtime) -> tokens, for files already checked


def check_vocabulary_file(path: Path) -> int:
    """Validate the vocabulary of the GGUF at `path` (once per file version per process);
    returns its number of tokens."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _checked:
        _checked[key] = check_vocabulary(read_header(path))
    return _checked[key]


def _array(header: GGUFHeader, key: str, item_types: tuple[int, ...], count: int | None,
           required: bool = False) -> LazyArray | None:
    value = header.metadata.get(key)
    if value is None:
        if required:
            raise ModelFileError(f"{header.path}: GGUF lacks {key}")
        return None
    if not isinstance(value, LazyArray) or value.item_type not in item_types:
        raise ModelFileError(f"{header.path}: {key} has the wrong type ({describe(value)})")
    if count is not None and value.count != count:
        raise ModelFileError(f"{header.path}: {key} has {value.count} entries, the "
                             f"vocabulary {count}")
    return value


def check_vocabulary(header: GGUFHeader) -> int:
    """Check the tokenizer metadata of `header`; returns the number of tokens."""
    meta, path = header.metadata, header.path
    model = meta.get("tokenizer.ggml.model")
    if not isinstance(model, str):
        raise ModelFileError(f"{path}: tokenizer.ggml.model is missing or not a string "
                             f"({describe(model)})")
    if model not in TOKENIZER_MODELS:
        raise UnsupportedModelError(f"{path}: tokenizer.ggml.model '{printable(model)}' is "
                                    f"not supported ({', '.join(TOKENIZER_MODELS)})")
    tokens = _array(header, "tokenizer.ggml.tokens", (_STRING_TYPE,), None, required=True)
    n = tokens.count
    if not 1 <= n <= MAX_TOKENS:
        raise ModelFileError(f"{path}: tokenizer.ggml.tokens has {n} tokens")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        array = meta.get(key)
        if isinstance(array, LazyArray) and array.nbytes > MAX_VOCAB_BYTES:
            raise ModelFileError(f"{path}: {key} spans {array.nbytes} bytes (limit "
                                 f"{MAX_VOCAB_BYTES})")
    texts = header.array("tokenizer.ggml.tokens", raw=True)
    seen: dict[bytes, int] = {}
    for i, token in enumerate(texts):
        if not token:
            raise ModelFileError(f"{path}: tokenizer.ggml.tokens: token {i} is empty")
        if token in seen:
            shown = printable(token.decode("utf-8", errors="replace"))[:40]
            raise ModelFileError(f"{path}: tokenizer.ggml.tokens: token '{shown}' appears "
                                 f"twice (ids {seen[token]} and {i})")
        seen[token] = i
    scores = _array(header, "tokenizer.ggml.scores", _FLOAT_TYPES, n)
    if scores is not None:
        values = header.array("tokenizer.ggml.scores")
        if not np.isfinite(values).all():
            raise ModelFileError(f"{path}: tokenizer.ggml.scores holds NaN or infinity")
    types = _array(header, "tokenizer.ggml.token_type", (5,), n)  # int32, as llama.cpp reads
    if types is not None:
        values = header.array("tokenizer.ggml.token_type")
        if values.min() < _TOKEN_TYPES.start or values.max() >= _TOKEN_TYPES.stop:
            raise ModelFileError(f"{path}: tokenizer.ggml.token_type holds values outside "
                                 f"{_TOKEN_TYPES.start}..{_TOKEN_TYPES.stop - 1}")
    _check_bytes(header, model, texts, seen,
                 header.array("tokenizer.ggml.token_type") if types is not None else None)
    _check_merges(header, model)
    _check_specials(header, n)
    return n


def _byte_tokens(model: str) -> list[bytes]:
    """The texts of the 256 tokens a vocabulary falls back to for bytes it has no token for:
    "<0xAB>" in SentencePiece vocabularies, GPT-2's printable stand-in of each byte in BPE
    ones (llama.cpp looks them up by text and aborts when one is missing)."""
    if model == "llama":
        return [f"<0x{b:02X}>".encode() for b in range(256)]
    printable_bytes = [*range(33, 127), *range(161, 173), *range(174, 256)]
    stand_in, extra = {}, 0
    for b in range(256):
        if b in printable_bytes:
            stand_in[b] = b
        else:
            stand_in[b], extra = 256 + extra, extra + 1
    return [chr(stand_in[b]).encode() for b in range(256)]


def _check_bytes(header: GGUFHeader, model: str, texts: list[bytes], ids: dict[bytes, int],
                 types: np.ndarray | None) -> None:
    missing = [t for t in _byte_tokens(model) if t not in ids]
    if missing:
        shown = printable(missing[0].decode("utf-8", errors="replace"))
        raise ModelFileError(f"{header.path}: tokenizer.ggml.tokens lacks byte token "
                             f"'{shown}' ({len(missing)} of 256 missing)")
    if types is not None and model == "llama":  # llama.cpp parses a byte token's hex digits
        for i in np.flatnonzero(types == _BYTE):
            token = texts[i]
            if len(token) != 6 or not token.startswith(b"<0x") or not token.endswith(b">") \
                    or not all(chr(c) in "0123456789ABCDEFabcdef" for c in token[3:5]):
                raise ModelFileError(f"{header.path}: tokenizer.ggml.token_type marks token "
                                     f"{i} as a byte, but it is not of the form <0xAB>")


def _check_merges(header: GGUFHeader, model: str) -> None:
    key = "tokenizer.ggml.merges"
    merges = _array(header, key, (_STRING_TYPE,), None, required=model == "gpt2")
    if merges is None:
        return
    for i, merge in enumerate(header.array(key, raw=True)):
        if merge.find(b" ", 1) < 0:  # llama.cpp splits each merge at its first inner space
            raise ModelFileError(f"{header.path}: {key}: merge {i} is not two tokens "
                                 "separated by a space")


def _check_specials(header: GGUFHeader, n: int) -> None:
    for key, value in header.metadata.items():
        if not key.startswith("tokenizer.ggml."):
            continue
        if key.endswith("_token_id"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ModelFileError(f"{header.path}: {key} must be an integer, got "
                                     f"{describe(value)}")
            if value != -1 and not 0 <= value < n:  # -1: no such token
                raise ModelFileError(f"{header.path}: {key}={value} is outside the "
                                     f"vocabulary (0..{n - 1})")
        elif key.startswith("tokenizer.ggml.add_") and not isinstance(value, bool):
            raise ModelFileError(f"{header.path}: {key} must be true or false, got "
                                 f"{describe(value)}")
        elif key == "tokenizer.ggml.pre" and not isinstance(value, str):
            raise ModelFileError(f"{header.path}: {key} must be a string, got "
                                 f"{describe(value)}")
