"""Streaming detokenizers: token ids in, finished text out, with O(1) work per token.

Generation produces one token at a time and wants to hand out text as soon as it is final.
Re-decoding the whole generated sequence at every step is quadratic in its length; the
detokenizers here only ever look at a short window of recent tokens instead.

Two kinds, for the two kinds of tokenizer the runtime loads:

* `ByteDetokenizer` for vocabularies whose tokens are raw bytes (llama.cpp / GGUF): the bytes
  go through an incremental UTF-8 decoder, so a character split across tokens comes out only
  once its last byte has arrived.
* `IncrementalDetokenizer` for tokenizers that only offer ``decode(ids) -> str`` (Hugging Face
  ``tokenizers``), where a token decoded alone may differ from the same token decoded in
  context (SentencePiece's leading space, byte-fallback tokens such as ``<0xE6>``). It uses the
  prefix-offset technique of text-generation servers.

Both follow the `StreamingDetokenizer` protocol::

    det = ByteDetokenizer(token_bytes)
    for token in tokens:
        print(det.add(token), end="")
    print(det.finish())

The concatenation of every ``add`` result and the final ``finish`` equals decoding all the
tokens at once (see each class for the exact guarantee). This module depends only on the
standard library.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from typing import Protocol, runtime_checkable

REPLACEMENT = "\ufffd"  # what an undecodable or not-yet-complete UTF-8 sequence decodes to


@runtime_checkable
class StreamingDetokenizer(Protocol):
    """Turns a stream of token ids into text, one token at a time."""

    def add(self, token: int) -> str:
        """Append one token; return the text that became final with it (complete characters
        only, possibly ``""``)."""
        ...

    def finish(self) -> str:
        """Return whatever text is still held back (an incomplete UTF-8 sequence becomes
        U+FFFD) and reset, so the detokenizer can start a new stream."""
        ...


class ByteDetokenizer:
    """Streaming detokenizer for byte vocabularies (llama.cpp / GGUF).

    `token_bytes` maps a token id to its raw bytes (e.g. ``list.__getitem__`` over a table of
    pieces). Work per token is proportional to that token's length. For any byte sequences,
    valid UTF-8 or not, the concatenation of all `add` results plus `finish` equals
    ``b"".join(map(token_bytes, ids)).decode("utf-8", errors="replace")`` exactly.
    """

    def __init__(self, token_bytes: Callable[[int], bytes]) -> None:
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        return self._decoder.decode(self._token_bytes(token))

    def finish(self) -> str:
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text


class IncrementalDetokenizer:
    """Streaming detokenizer for tokenizers that only offer ``decode(ids) -> str``.

    The prefix-offset technique: the detokenizer keeps a window of tokens, ``ids[:read]`` (the
    *prefix*, already emitted: the tokens of the previous emitted piece) and ``ids[read:]``
    (pending). On each token it decodes the window; if the result is longer than the prefix's
    own decoding and does not end in U+FFFD (an incomplete character), the difference is
    emitted, the pending tokens become the new prefix and older tokens are dropped. Decoding
    the prefix along with the new tokens gives the tokenizer its context, so context-dependent
    decoding (leading-space rules, byte-fallback sequences) comes out as in a whole decode.
    Work per token is bounded by the window, not by the length of the text.

    Guarantee and caveat (the standard ones for this technique): for valid text from ordinary
    tokenizers, the pieces concatenated equal ``decode(all_ids)``. It relies on decoding being
    local: a token must not change the decoding of text more than one emitted piece back, and
    the decoding of a window's prefix must be a prefix of the window's decoding. Decoders that
    rewrite across pieces (e.g. ``clean_up_tokenization_spaces`` turning ``" ."`` into ``"."``)
    can make the stream differ from a whole decode, as can invalid UTF-8 under byte-fallback
    decoders (which replace a whole run of bad byte tokens at once); then only the placement or
    number of U+FFFD characters differs.

    Degenerate streams (text that keeps ending in U+FFFD, tokens that decode to nothing) never
    reach an emit point. So every `max_pending` tokens without one, `_force` emits at the
    latest token boundary that decodes consistently, keeping the window bounded. That test is
    exact for byte-level (GPT-2 style) decoders; under byte-fallback decoders a forced emit
    inside invalid bytes may change the number of U+FFFD. Valid text gets there only through
    tokens that decode to nothing (a leading ``"▁"`` stripped, skipped special tokens), since
    at most 4 byte tokens complete a character; hence `max_pending` >= 8 (default 16).
    """

    def __init__(self, decode: Callable[[list[int]], str], max_pending: int = 16) -> None:
        if max_pending < 8:  # a character is at most 4 bytes; the rest is slack (see above)
            raise ValueError(f"max_pending must be >= 8, got {max_pending}")
        self._decode = decode
        self._max_pending = max_pending
        self._ids: list[int] = []  # the window: prefix (already emitted) + pending tokens
        self._read = 0  # ids[:read] is the prefix
        self._prefix_text = ""  # decode(ids[:read])

    def add(self, token: int) -> str:
        self._ids.append(int(token))
        text = self._decode(self._ids)
        if len(text) > len(self._prefix_text) and not text.endswith(REPLACEMENT):
            return self._emit(text, len(self._ids))
        if (len(self._ids) - self._read) % self._max_pending == 0:
            return self._force(text)
        return ""

    def finish(self) -> str:
        text = self._decode(self._ids) if len(self._ids) > self._read else self._prefix_text
        piece = text[len(self._prefix_text):]
        self._ids, self._read, self._prefix_text = [], 0, ""
        return piece

    def _emit(self, text: str, cut: int) -> str:
        """Emit ``text`` (the decoding of ``ids[:cut]``) past the prefix; ``ids[read:cut]``
        becomes the new prefix and the old prefix is dropped."""
        piece = text[len(self._prefix_text):]
        del self._ids[:self._read]
        self._read = cut - self._read
        self._prefix_text = self._decode(self._ids[:self._read])
        return piece

    def _force(self, text: str) -> str:
        """Emit although the window's text ends in U+FFFD or has not grown, so that the window
        stays bounded; return ``""`` when no safe point exists.

        The cut is the latest token boundary where head and tail decode to the whole, with a
        non-empty tail: for UTF-8 decoding with replacement this means the tail's first byte
        already settled how the head ends, so later tokens cannot change the head's text.
        Without such a cut, everything is emitted if the text ends in a complete character
        (the tokens decoded to nothing new); otherwise the tokens may still be completing a
        valid character, and the detokenizer keeps waiting.
        """
        for cut in range(len(self._ids) - 1, self._read, -1):
            head = self._decode(self._ids[:cut])
            tail = self._decode(self._ids[cut:])
            if tail and head + tail == text and len(head) >= len(self._prefix_text):
                return self._emit(head, cut)
        if not text.endswith(REPLACEMENT):
            return self._emit(text, len(self._ids))
        return ""
