"""Tokenizers: the GGUF's own vocabulary (through llama.cpp, vocab only) or tokenizer.json.

Both expose the same small interface, so generation never cares where a model came from.
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from ..detokenize import ByteDetokenizer, IncrementalDetokenizer, StreamingDetokenizer
from ..errors import ModelFileError
from ..memory import release_freed_memory
from ..values import describe, integer
from .gguf_header import read_header
from .gguf_vocab import check_vocabulary_file
from .llama_backend import check_vocabulary, load_llama_cpp
from .spm_encoder import SpmEncoder


class Tokenizer(Protocol):
    bos_id: int | None
    eog_ids: frozenset[int]  # tokens that end generation (EOS, end-of-turn, ...)
    vocab_size: int

    def encode(self, text: str, add_special: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def detokenizer(self) -> StreamingDetokenizer:
        """A fresh streaming detokenizer (O(1) work per generated token)."""
        ...

    def special_text(self, token: int) -> str:
        """The literal text of a token, special tokens included (e.g. "<bos>")."""
        ...


class GGUFTokenizer:
    """Tokenizes exactly as llama.cpp does, from the vocabulary stored in the GGUF file."""

    def __init__(self, path: Path):
        check_vocabulary_file(path)  # what llama.cpp would abort on, refused here
        check_vocabulary(path)  # in a child first: llama.cpp must not crash this process
        llama_cpp = self._lib = load_llama_cpp()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            raise ModelFileError(f"{path}: llama.cpp could not read the GGUF vocabulary")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.vocab_size = llama_cpp.llama_vocab_n_tokens(self._vocab)
        bos = llama_cpp.llama_vocab_bos(self._vocab)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self.bos_id = bos if bos >= 0 else None
        self.eog_ids = frozenset(
            i for i in range(self.vocab_size) if llama_cpp.llama_vocab_is_eog(self._vocab, i))
        self._pieces: dict[int, bytes] = {}

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buffer = (self._lib.llama_token * capacity)()
        n = self._lib.llama_tokenize(self._vocab, data, len(data), buffer, capacity,
                                     add_special, True)
        if n < 0:
            capacity = -n
            buffer = (self._lib.llama_token * capacity)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), buffer, capacity,
                                         add_special, True)
        return list(buffer[:n])

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._token_to_piece(token)
        return piece

    def _token_to_piece(self, token: int, special: bool = False) -> bytes:
        buffer = ctypes.create_string_buffer(64)
        n = self._lib.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, special)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0,
                                               special)
        return buffer.raw[:n]

    def special_text(self, token: int) -> str:
        return self._token_to_piece(token, special=True).decode("utf-8", errors="replace")

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in ids).decode("utf-8", errors="replace")

    def detokenizer(self) -> StreamingDetokenizer:
        return ByteDetokenizer(self.token_bytes)

    def __del__(self):
        if getattr(self, "_model", None):
            self._lib.llama_model_free(self._model)
            self._model = None


class LeanGGUFTokenizer:
    """GGUF tokenizer for tight memory budgets: encodes with the compact SentencePiece encoder
    where it gives llama.cpp's ids (~8 MB for 262k tokens), else loads llama.cpp's vocabulary
    (~45 MB) only while encoding and frees it afterwards; decoding uses a compact piece table
    (token bytes + offsets, written into the store at convert time)."""

    def __init__(self, gguf_path: Path, pieces: np.ndarray, offsets: np.ndarray, bos_id,
                 eog_ids, bos_text: str, encoder: SpmEncoder | None = None):
        if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != len(pieces) or \
                np.any(np.diff(offsets) < 0):
            raise ModelFileError(f"{gguf_path.parent}: corrupt token piece table")
        self._gguf_path = gguf_path
        self._pieces = pieces
        self._offsets = offsets
        self.vocab_size = len(offsets) - 1
        self.bos_id = bos_id
        self.eog_ids = frozenset(eog_ids)
        self._bos_text = bos_text
        self._encoder = encoder
        self.before_encode: Callable[[], None] | None = None  # frees room for the vocabulary

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        if self._encoder is not None:
            return self._encoder.encode(text, add_special)
        if self.before_encode is not None:
            self.before_encode()
        tokenizer = GGUFTokenizer(self._gguf_path)
        try:
            return tokenizer.encode(text, add_special)
        finally:
            del tokenizer
            release_freed_memory()

    def token_bytes(self, token: int) -> bytes:
        return self._pieces[self._offsets[token]:self._offsets[token + 1]].tobytes()

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in ids).decode("utf-8", errors="replace")

    def detokenizer(self) -> StreamingDetokenizer:
        return ByteDetokenizer(self.token_bytes)

    def special_text(self, token: int) -> str:
        return self._bos_text if token == self.bos_id else self.decode([token])


# Text the compact encoder must encode as llama.cpp does before a store uses it: prose,
# whitespace runs, byte fallback, spaces beside special tokens (completed per vocabulary with
# some of its own special tokens, see compact_encoder).
_PROBE = ("Hello world!  Two  spaces,\ttabs\t\tand\n\nnewlines\n\n\n. Ünïcödé 日本語 🤖 "
          "\u2581 <0x41> x=1;y=2 ")


def compact_encoder(gguf_path: Path, reference: GGUFTokenizer | None) -> SpmEncoder | None:
    """The compact SentencePiece encoder of the vocabulary at `gguf_path` if it encodes a
    probe text exactly as llama.cpp (`reference`, the same vocabulary) does; else None.
    Without a reference (convert ran this check and recorded that it passed) the encoder is
    returned where the vocabulary has one."""
    encoder = SpmEncoder.for_vocabulary(read_header(gguf_path))
    if encoder is None or reference is None:
        return encoder
    specials = encoder.special_texts()
    probe = _PROBE + " ".join(specials[:32] + specials[-32:]) + _PROBE + \
        "".join(specials[:8]) + "end"
    for add_special in (True, False):
        if encoder.encode(probe, add_special) != reference.encode(probe, add_special):
            return None
    return encoder


class HFTokenizer:
    """tokenizer.json through the `tokenizers` library, with specials from the folder's configs."""

    def __init__(self, folder: Path, config: dict):
        from tokenizers import Tokenizer as RustTokenizer

        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelFileError(f"{folder}: no tokenizer.json")
        try:
            self._tok = RustTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust library raises plain Exception on bad files
            raise ModelFileError(f"{path}: unreadable tokenizer ({exc})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        tok_config = read_json(folder / "tokenizer_config.json") or {}
        gen_config = read_json(folder / "generation_config.json") or {}
        self.bos_id = self._special_id(tok_config.get("bos_token"), "bos_token")
        if self.bos_id is None and config.get("bos_token_id") is not None:
            self.bos_id = self._checked_id(config["bos_token_id"], "bos_token_id")
        eos = gen_config.get("eos_token_id", config.get("eos_token_id"))
        eos_ids = {self._checked_id(i, "eos_token_id")
                   for i in (eos if isinstance(eos, list) else [eos] if eos is not None else [])}
        named = self._special_id(tok_config.get("eos_token"), "eos_token")
        if named is not None:
            eos_ids.add(named)
        self.eog_ids = frozenset(eos_ids)
        self.chat_template = _chat_template(tok_config.get("chat_template"), folder)

    def _checked_id(self, value, name: str) -> int:
        return integer(value, f"{name} (of the model folder's configs)", 0,
                       self.vocab_size - 1)

    def _special_id(self, token: str | dict | None, name: str) -> int | None:
        """The id of a special token named by its text (or {"content": text})."""
        if isinstance(token, dict):
            token = token.get("content")
        if token is not None and not isinstance(token, str):
            raise ModelFileError(f"tokenizer_config.json: {name} must be a string, got "
                                 f"{describe(token)}")
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        try:
            return self._tok.encode(text, add_special_tokens=add_special).ids
        except Exception as exc:  # the Rust library's errors are plain Exceptions
            raise ModelFileError(f"the model's tokenizer.json failed to encode: {exc}") from None

    def decode(self, ids: list[int]) -> str:
        try:
            return self._tok.decode(ids, skip_special_tokens=True)
        except Exception as exc:
            raise ModelFileError(f"the model's tokenizer.json failed to decode: {exc}") from None

    def detokenizer(self) -> StreamingDetokenizer:
        return IncrementalDetokenizer(self.decode)

    def special_text(self, token: int) -> str:
        return self._tok.id_to_token(token) or ""


def read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ModelFileError(f"{path}: expected a JSON object")
    return value


def _chat_template(value, folder: Path) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of named templates (the
    one named "default" is used)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        return next((t["template"] for t in value if t["name"] == "default"), None)
    raise ModelFileError(f"{folder}/tokenizer_config.json: chat_template is neither a string "
                         "nor a list of named templates")
