"""SentencePiece-style encoding as llama.cpp does it, from compact arrays.

llama.cpp's vocabulary for Gemma 3 (262k tokens) takes ~45 MB while it is loaded; at a 25%
budget that transient decided which stores could run at all. This encoder holds the same
vocabulary in ~8 MB of numpy arrays (the token bytes, their offsets and scores, an
open-addressing hash table over them) and encodes the way llama.cpp's SPM tokenizer does:

1. Special tokens (control, user-defined and unknown types: Gemma's "<start_of_turn>", its
   runs of newlines, spaces and tabs) are cut out of the text first, longest first, each
   occurrence left to right in what is still plain text.
2. Each plain fragment gets a leading space if the vocabulary asks for one after a special
   token (`tokenizer.ggml.add_space_prefix`), spaces become U+2581, and the fragment is split
   into UTF-8 characters.
3. Adjacent symbols merge, highest-scoring vocabulary entry first (ties: leftmost), until no
   neighbouring pair forms a token; a symbol that is no token becomes its bytes' <0xAB> tokens.

Only vocabularies where this is exact are accepted (`SpmEncoder.for_vocabulary`): SentencePiece
("llama") models whose special tokens of equal length can never overlap in part (llama.cpp
sorts them by length only, so their order would otherwise decide). The runtime also checks
the encoder against llama.cpp on a probe text when it opens a store (runtime/engine.py).
"""

from __future__ import annotations

import heapq

import numpy as np
from numba import njit

from ..errors import ModelFileError
from .gguf_header import GGUFHeader, LazyArray

SPACE = "\u2581"  # SentencePiece's visible space
_SPECIAL_TYPES = (2, 3, 4)  # llama_token_type: unknown, control, user-defined
_EMPTY = np.int32(-1)
_HEAD = 4  # characters of a special token that are looked for first (Gemma's 6,242
# "<unused...>" tokens share one head, so a text without it is scanned once for them all)


@njit(cache=True, inline="always")
def _hash(data, start, end):
    """FNV-1a of data[start:end]."""
    h = np.uint64(14695981039346656037)
    for i in range(start, end):
        h = (h ^ np.uint64(data[i])) * np.uint64(1099511628211)
    return h


@njit(cache=True)
def _build_table(texts, offsets, table):
    """table[slot] = token id, open addressing over the FNV-1a of each token's bytes."""
    mask = np.uint64(table.shape[0] - 1)
    for token in range(offsets.shape[0] - 1):
        slot = _hash(texts, offsets[token], offsets[token + 1]) & mask
        while table[slot] >= 0:
            slot = (slot + np.uint64(1)) & mask
        table[slot] = token


@njit(cache=True)
def _find(texts, offsets, table, data, start, end):
    """The id of the token whose bytes are data[start:end], or -1."""
    mask = np.uint64(table.shape[0] - 1)
    slot = _hash(data, start, end) & mask
    n = end - start
    while True:
        token = table[slot]
        if token < 0:
            return -1
        at = offsets[token]
        if offsets[token + 1] - at == n:
            same = True
            for i in range(n):
                if texts[at + i] != data[start + i]:
                    same = False
                    break
            if same:
                return token
        slot = (slot + np.uint64(1)) & mask


@njit(cache=True)
def _utf8_length(byte):
    """llama.cpp's unicode_len_utf8: 1 for ASCII and stray continuation bytes."""
    top = byte >> 4
    return 4 if top == 15 else 3 if top == 14 else 2 if top >= 12 else 1


@njit(cache=True)
def _encode(data, texts, offsets, scores, table, byte_ids, out):
    """Token ids of the (escaped) fragment `data` into out; returns how many."""
    n = data.shape[0]
    start = np.empty(n, np.int64)
    length = np.empty(n, np.int64)
    prev = np.empty(n, np.int64)
    nxt = np.empty(n, np.int64)
    count, i = 0, 0
    while i < n:
        start[count] = i
        length[count] = min(_utf8_length(data[i]), n - i)
        prev[count], nxt[count] = count - 1, count + 1
        i += length[count]
        count += 1
    if count == 0:
        return 0
    nxt[count - 1] = -1
    # the queue: (-score, left symbol, bytes): the best score first, then the leftmost
    queue = [(np.float32(0.0), np.int64(0), np.int64(0))]
    queue.pop()
    for right in range(1, count):
        left = right - 1
        token = _find(texts, offsets, table, data, start[left], start[right] + length[right])
        if token >= 0:
            heapq.heappush(queue, (-scores[token], np.int64(left),
                                   length[left] + length[right]))
    while queue:
        _, left, size = heapq.heappop(queue)
        right = nxt[left]
        if right < 0 or length[left] == 0 or length[right] == 0 or \
                length[left] + length[right] != size:
            continue  # one side has merged since this pair was queued
        length[left] += length[right]
        length[right] = 0
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = left
        for a in (prev[left], left):
            b = nxt[a] if a >= 0 else -1
            if a >= 0 and b >= 0:
                token = _find(texts, offsets, table, data, start[a], start[b] + length[b])
                if token >= 0:
                    heapq.heappush(queue, (-scores[token], np.int64(a),
                                           length[a] + length[b]))
    written = 0
    symbol = 0
    while symbol >= 0:
        token = _find(texts, offsets, table, data, start[symbol], start[symbol] + length[symbol])
        if token >= 0:
            out[written] = token
            written += 1
        else:  # no such token: its bytes
            for k in range(start[symbol], start[symbol] + length[symbol]):
                out[written] = byte_ids[data[k]]
                written += 1
        symbol = nxt[symbol]
    return written


@njit(cache=True)
def _read_strings(raw, count, texts, offsets):
    """GGUF string array items (u64 length, bytes) from raw into texts/offsets; False if
    they do not fit the array's bytes (GGUFHeader.array would make 262k bytes objects)."""
    pos, used = 0, 0
    for i in range(count):
        if pos + 8 > raw.shape[0]:
            return False
        n = 0
        for k in range(8):
            n |= np.int64(raw[pos + k]) << (8 * k)
        pos += 8
        if n < 0 or pos + n > raw.shape[0] or used + n > texts.shape[0]:
            return False
        texts[used:used + n] = raw[pos:pos + n]
        pos += n
        used += n
        offsets[i + 1] = used
    return used == texts.shape[0]


def warm_up() -> None:
    """Compile the kernels (or load them from numba's cache) on a two-token vocabulary, with
    the array types real vocabularies give them, so that compiling counts in the process
    baseline rather than in a memory budget (runtime/engine.process_baseline)."""
    raw = np.frombuffer(b"\x01" + bytes(7) + b"a" + b"\x01" + bytes(7) + b"b", np.uint8).copy()
    texts, offsets = np.empty(2, np.uint8), np.zeros(3, np.int64)
    _read_strings(raw, 2, texts, offsets)
    table = np.full(4, _EMPTY, np.int32)
    _build_table(texts, offsets, table)
    data = np.frombuffer(b"ab", np.uint8)
    _find(texts, offsets, table, data, 0, 1)
    _encode(data, texts, offsets, np.zeros(2, np.float32), table, np.zeros(256, np.int32),
            np.empty(2, np.int32))


class SpmEncoder:
    """Encodes text to the ids llama.cpp gives, for a checked SentencePiece vocabulary
    (loader/gguf_vocab.check_vocabulary: unique tokens, byte tokens present, finite scores,
    types in range). Made by `for_vocabulary`, which says where it would not be exact."""

    def __init__(self, header: GGUFHeader, texts: np.ndarray, offsets: np.ndarray,
                 specials: list[tuple[str, int]]):
        meta = header.metadata
        n = offsets.shape[0] - 1
        self._texts, self._offsets = texts, offsets
        scores = header.array("tokenizer.ggml.scores")
        self._scores = np.zeros(n, np.float32) if scores is None else scores.astype(np.float32)
        self._table = np.full(1 << max(4, (2 * n - 1).bit_length()), _EMPTY, np.int32)
        _build_table(texts, offsets, self._table)
        self._byte_ids = np.array([self._id(f"<0x{b:02X}>".encode()) for b in range(256)],
                                  np.int32)
        self._specials = specials
        self._heads = {text[:_HEAD] for text, _ in specials}
        self._add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        self._add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
        self._add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        self._bos = meta.get("tokenizer.ggml.bos_token_id", 1)
        self._eos = meta.get("tokenizer.ggml.eos_token_id", 2)

    @classmethod
    def for_vocabulary(cls, header: GGUFHeader) -> SpmEncoder | None:
        """The encoder of the vocabulary of `header`, or None where it would not give
        llama.cpp's ids: not a SentencePiece model, per-model token attributes llama.cpp adds
        by name (the lstrip/rstrip of Phi-3 and Jina), a special token that is not UTF-8, or
        two special tokens of equal length that can overlap in part."""
        meta = header.metadata
        if meta.get("tokenizer.ggml.model") != "llama":
            return None
        names = " ".join(str(meta.get(k, "")).lower() for k in
                         ("general.name", "general.architecture", "tokenizer.ggml.pre"))
        if any(word in names for word in ("phi-3", "phi3", "jina", "nomic-bert-moe")):
            return None
        tokens = meta["tokenizer.ggml.tokens"]
        n = tokens.count
        if not isinstance(tokens, LazyArray) or not 0 <= 8 * n <= tokens.nbytes:
            raise ModelFileError(f"{header.path}: tokenizer.ggml.tokens is malformed")
        texts = np.empty(tokens.nbytes - 8 * n, np.uint8)
        offsets = np.zeros(n + 1, np.int64)
        if not _read_strings(_file_bytes(header, tokens), n, texts, offsets):
            raise ModelFileError(f"{header.path}: tokenizer.ggml.tokens is malformed")
        types = header.array("tokenizer.ggml.token_type")
        special_ids = [] if types is None else \
            np.flatnonzero(np.isin(types, _SPECIAL_TYPES)).tolist()
        by_length: dict[int, list[bytes]] = {}
        specials = []
        for token in special_ids:
            text = texts[offsets[token]:offsets[token + 1]].tobytes()
            try:
                specials.append((text.decode("utf-8"), token))
            except UnicodeDecodeError:
                return None
            by_length.setdefault(len(text), []).append(text)
        if not all(_no_partial_overlaps(group) for group in by_length.values()):
            return None
        specials.sort(key=lambda item: -len(item[0].encode()))  # longest first, as llama.cpp
        encoder = cls(header, texts, offsets, specials)
        return encoder if encoder.ids_fit(n) else None

    def ids_fit(self, n: int) -> bool:
        """Whether every id this encoder can add on its own (BOS, EOS, byte fallbacks) is one
        of the n tokens."""
        added = [*(self._bos,) * self._add_bos, *(self._eos,) * self._add_eos]
        return all(type(i) is int and 0 <= i < n for i in added) and \
            bool((self._byte_ids >= 0).all())

    def special_texts(self) -> list[str]:
        """The texts of the special tokens, longest first."""
        return [text for text, _ in self._specials]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self._texts, self._offsets, self._scores, self._table,
                                      self._byte_ids))

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        ids: list[int] = []
        if add_special and self._add_bos:
            ids.append(self._bos)
        prev_special = True  # a leading space goes before the first fragment
        for fragment in self._partition(text):
            if isinstance(fragment, int):
                ids.append(fragment)
                prev_special = True
                continue
            if self._add_space_prefix and prev_special:
                fragment = " " + fragment
            data = np.frombuffer(fragment.replace(" ", SPACE).encode("utf-8"), np.uint8)
            out = np.empty(max(1, data.shape[0]), np.int32)
            n = _encode(data, self._texts, self._offsets, self._scores, self._table,
                        self._byte_ids, out)
            ids.extend(out[:n].tolist())
            prev_special = False
        if add_special and self._add_eos:
            ids.append(self._eos)
        return ids

    def _partition(self, text: str) -> list[str | int]:
        """The text as plain fragments and special token ids, llama.cpp's way: longest
        special first; within what is still plain, each occurrence left to right. Work per
        special token present is linear in the fragments so far (no list surgery per
        occurrence)."""
        plain = [(0, len(text))] if text else []  # sorted (start, end) of the plain regions
        specials: list[tuple[int, int]] = []  # (start, token id)
        heads = {head for head in self._heads if head in text}  # one scan per shared head
        for piece, token in self._specials:
            if piece[:_HEAD] not in heads or piece not in text:
                continue
            starts, k, pos = [], 0, text.find(piece)
            while pos >= 0:
                while k < len(plain) and plain[k][1] <= pos:
                    k += 1
                if k == len(plain):
                    break
                a, b = plain[k]
                if pos < a:  # inside a special cut out before: look on from this region
                    pos = text.find(piece, a)
                elif pos + len(piece) <= b:
                    starts.append(pos)
                    pos = text.find(piece, pos + len(piece))
                else:
                    pos = text.find(piece, pos + 1)
            if starts:
                plain = _cut(plain, starts, len(piece))
                specials += [(start, token) for start in starts]
        parts: list[tuple[int, str | int]] = [(a, text[a:b]) for a, b in plain]
        parts += specials
        return [part for _, part in sorted(parts, key=lambda item: item[0])]

    def _id(self, text: bytes) -> int:
        data = np.frombuffer(text, np.uint8)
        return int(_find(self._texts, self._offsets, self._table, data, 0, data.shape[0]))


def _cut(plain: list[tuple[int, int]], starts: list[int], n: int) -> list[tuple[int, int]]:
    """The plain regions without [start, start + n) for each of the sorted `starts` (each
    inside one region)."""
    out, j = [], 0
    for a, b in plain:
        cursor = a
        while j < len(starts) and starts[j] < b:
            if starts[j] > cursor:
                out.append((cursor, starts[j]))
            cursor = starts[j] + n
            j += 1
        if cursor < b:
            out.append((cursor, b))
    return out


def _file_bytes(header: GGUFHeader, array: LazyArray) -> np.ndarray:
    return np.fromfile(header.path, np.uint8, array.nbytes, offset=array.offset)


def _no_partial_overlaps(group: list[bytes]) -> bool:
    """Whether no proper suffix of one token is a proper prefix of another (tokens of one
    length: then the order among them cannot change what is cut out; a token overlapping
    itself, as a run of newlines does, is cut the same way in any order)."""
    owners: dict[bytes, bytes | None] = {}  # prefix -> its token, None if several have it
    for token in group:
        for k in range(1, len(token)):
            owner = owners.get(token[:k], token)
            owners[token[:k]] = token if owner == token else None
    return not any(owners.get(token[k:], token) != token
                   for token in group for k in range(1, len(token)))
