"""Streaming detokenizers: the stream equals a whole decode, never shows a partial character,
and does O(1) work per token. No model files, no network: tokenizers are built in memory."""

from __future__ import annotations

import random
from itertools import combinations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from flashinfer_ondevice import detokenize as detok
from flashinfer_ondevice.detokenize import ByteDetokenizer, IncrementalDetokenizer

FFFD = "\ufffd"

SENTENCES = [
    "The café served crème brûlée and a piña colada. Résumé, naïve, façade, déjà vu.",
    "日本語のテキストです。東京は日本の首都です。漢字とひらがなとカタカナ。",
    "中文文本：我们今天去北京。한국어 문장도 있습니다.",
    "Emoji time 🙂🙂 and 🚀 to the moon 🌕, family 👨‍👩‍👧 and flags 🇫🇷🇯🇵.",
    "Plain ASCII text about tokens, bytes and streaming detokenizers, repeated often.",
    "Ελληνικά και русский текст, עברית, العربية, हिन्दी.",
]


def stream(det, ids) -> list[str]:
    """Every piece the detokenizer hands out, `finish` last."""
    return [det.add(t) for t in ids] + [det.finish()]


# ---------------------------------------------------------------- ByteDetokenizer


def byte_table(pieces: list[bytes]):
    return ByteDetokenizer(pieces.__getitem__)


@pytest.mark.parametrize("text", ["é", "日本語", "🙂", "aé日🙂z"])
def test_bytes_split_at_every_boundary(text):
    data = text.encode()
    for n_cuts in (1, 2, 3):
        for cuts in combinations(range(1, len(data)), n_cuts):
            bounds = [0, *cuts, len(data)]
            pieces = [data[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
            out = stream(byte_table(pieces), range(len(pieces)))
            assert "".join(out) == text, pieces
            for piece in out:  # no partial character ever shows mid-stream
                assert FFFD not in piece, pieces
            # a character comes out exactly at the token holding its last byte
            ends = {len(text[:i + 1].encode()) for i in range(len(text))}
            for i, piece in enumerate(out[:-1]):
                emitted = "".join(out[:i + 1])
                assert len(emitted.encode()) == max([e for e in ends if e <= bounds[i + 1]],
                                                    default=0), (pieces, i, piece)
            assert out[-1] == ""


def test_bytes_one_byte_per_token():
    text = "naïve 日本語 🙂!"
    pieces = [bytes([b]) for b in text.encode()]
    out = stream(byte_table(pieces), range(len(pieces)))
    assert "".join(out) == text
    assert all(FFFD not in p for p in out)
    assert sum(1 for p in out if p) == len(text)  # one piece per character


@pytest.mark.parametrize("pieces", [
    [b"a", b"\xff", b"b"],  # a lone invalid byte
    [b"\xff"],
    [b"ok", b"\xe6\x97"],  # truncated sequence at the end
    [b"\xf0\x9f", b"\x99"],  # truncated 4-byte sequence at the end
    [b"\xe6", b"A", b"\x97\xa5"],  # interrupted sequence, then a stray continuation
    [b"\xc0\xaf", b"\xed\xa0\x80", b"x"],  # overlong and surrogate encodings
    [b"\xf4\x90\x80\x80"],  # beyond U+10FFFF
])
def test_bytes_invalid_utf8_matches_whole_decode(pieces):
    out = stream(byte_table(pieces), range(len(pieces)))
    assert "".join(out) == b"".join(pieces).decode("utf-8", errors="replace")
    assert FFFD in "".join(out)


def test_bytes_truncated_end_is_held_until_finish():
    det = byte_table([b"ok", b"\xe6\x97"])
    assert det.add(0) == "ok"
    assert det.add(1) == ""  # could still complete
    assert det.finish() == FFFD
    assert det.add(0) == "ok"  # finish resets
    assert det.finish() == ""


def test_bytes_random_sequences_match_whole_decode():
    rng = random.Random(1234)
    alphabet = [bytes([b]) for b in range(256)] + [c.encode() for c in "é日本語🙂👨‍👩‍👧"]
    for trial in range(400):
        blob = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        if trial % 2:  # half mostly valid UTF-8: a random text's bytes, cut at random
            blob = "".join(rng.choice(SENTENCES[trial % len(SENTENCES)])
                           for _ in range(30)).encode()
        n_cuts = max(0, min(len(blob) - 1, rng.randint(0, 20)))
        cuts = sorted(rng.sample(range(1, len(blob)), n_cuts))
        bounds = [0, *cuts, len(blob)] if blob else []
        pieces = [blob[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        out = stream(byte_table(pieces), range(len(pieces)))
        expected = blob.decode("utf-8", errors="replace")
        assert "".join(out) == expected, pieces
        if FFFD not in expected:
            assert all(FFFD not in p for p in out), pieces


def test_protocol():
    assert isinstance(ByteDetokenizer(lambda t: b""), detok.StreamingDetokenizer)
    assert isinstance(IncrementalDetokenizer(lambda ids: ""), detok.StreamingDetokenizer)


# ---------------------------------------------------------------- IncrementalDetokenizer


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    """A byte-level BPE (GPT-2 style) trained in memory with a small vocabulary, so CJK
    characters and emoji are split across tokens; every single byte is a token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 3, trainer)
    return tok


@pytest.fixture(scope="module")
def spm() -> Tokenizer:
    """A SentencePiece-like (Llama style) BPE: Metaspace, byte fallback for characters not in
    the vocabulary (<0xE6> tokens), and a decoder that strips the leading space."""
    vocab: dict[str, int] = {"<unk>": 0}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in "▁" + "".join(chr(c) for c in range(33, 127)) + "éè":
        vocab.setdefault(ch, len(vocab))
    merges = []
    for word in ("▁the", "▁café", "▁text", "▁tokens", "▁and", "▁streaming", "▁moon"):
        for i in range(2, len(word) + 1):
            if word[:i] not in vocab:
                merges.append((word[:i - 1], word[i - 1]))
                vocab[word[:i]] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                               byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return tok


def test_bpe_fixture_splits_characters(bpe):
    """The tests below are only meaningful if some tokens hold partial characters."""
    ids = bpe.encode(" ".join(SENTENCES)).ids
    assert sum(FFFD in bpe.decode([i]) for i in ids) >= 10


@pytest.mark.parametrize("text", SENTENCES + [" ".join(SENTENCES), "🙂", " 日本 "])
def test_incremental_bpe_matches_whole_decode(bpe, text):
    ids = bpe.encode(text).ids
    out = stream(IncrementalDetokenizer(bpe.decode), ids)
    assert "".join(out) == bpe.decode(ids) == text
    assert all(FFFD not in p for p in out)


def test_incremental_spm_matches_whole_decode(spm):
    text = "the café text: 日本語 🙂 and tokens to the moon 🚀 streaming ok"
    ids = spm.encode(text).ids
    pieces = [spm.id_to_token(i) for i in ids]
    assert "<0xE6>" in pieces and "▁the" in pieces  # byte fallback and merged words in play
    assert spm.decode(ids[:1]) == "the"  # leading space stripped, but only at the very start
    out = stream(IncrementalDetokenizer(spm.decode), ids)
    assert "".join(out) == spm.decode(ids) == text
    assert all(FFFD not in p for p in out)
    assert " text" in out  # in context the space survives: a naive per-token decode drops it
    # "▁" stripped at the start decodes to nothing, then four byte-fallback tokens
    ids = spm.encode("👩oe").ids
    assert len(ids) == 7
    out = stream(IncrementalDetokenizer(spm.decode, max_pending=8), ids)
    assert out == ["", "", "", "", "👩", "o", "e", ""]


def test_incremental_random_valid_streams(bpe, spm):
    rng = random.Random(7)
    chars = "".join(SENTENCES)
    for tok in (bpe, spm):
        for _ in range(100):
            text = "".join(rng.choice(chars) for _ in range(rng.randint(1, 60)))
            ids = tok.encode(text).ids
            det = IncrementalDetokenizer(tok.decode, max_pending=rng.choice([8, 16]))
            out = stream(det, ids)
            assert "".join(out) == tok.decode(ids)
            assert all(FFFD not in p for p in out)


def test_incremental_random_byte_tokens_match_whole_decode(bpe):
    """Any byte-level token sequence, invalid UTF-8 included (the forced emit included)."""
    rng = random.Random(99)
    byte_ids = [bpe.token_to_id(c) for c in pre_tokenizers.ByteLevel.alphabet()]
    vocab = list(range(bpe.get_vocab_size()))
    for trial in range(300):
        pool = byte_ids if trial % 2 else vocab
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 80))]
        det = IncrementalDetokenizer(bpe.decode, max_pending=rng.choice([8, 9, 16]))
        assert "".join(stream(det, ids)) == bpe.decode(ids), ids


def test_incremental_holds_incomplete_character(bpe):
    ids = [bpe.token_to_id(c) for c in _byte_level("日")]  # three one-byte tokens
    det = IncrementalDetokenizer(bpe.decode)
    assert [det.add(i) for i in ids] == ["", "", "日"]
    assert det.add(ids[0]) == ""
    assert det.finish() == FFFD  # a truncated character at the end
    assert det.finish() == ""


def _byte_level(text: str) -> list[str]:
    """The byte-level (GPT-2) alphabet characters for the bytes of `text`."""
    table = {}
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    n = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return [table[b] for b in text.encode()]


class CountingDecode:
    def __init__(self, decode):
        self.decode = decode
        self.calls = 0
        self.longest = 0

    def __call__(self, ids: list[int]) -> str:
        self.calls += 1
        self.longest = max(self.longest, len(ids))
        return self.decode(ids)


def test_incremental_work_per_token_is_bounded(bpe):
    ids: list[int] = []
    while len(ids) < 5000:
        ids += bpe.encode(" ".join(SENTENCES)).ids
    ids = ids[:5000]
    counting = CountingDecode(bpe.decode)
    det = IncrementalDetokenizer(counting)
    out = stream(det, ids)
    assert "".join(out) == bpe.decode(ids)
    assert counting.longest < 20  # the window, not the 5,000-token text
    assert counting.calls <= 2 * len(ids) + 1  # at most two decodes per token
    assert len(det._ids) == 0  # finish resets; the window never kept the whole history


def test_incremental_degenerate_stream_stays_bounded(bpe):
    """Text that never stops ending in U+FFFD, or tokens that decode to nothing, would grow
    the window forever; the forced emit keeps it bounded."""
    ff = bpe.token_to_id(chr(0xFF))  # byte 0xFF is printable in the byte-level alphabet
    for ids, decode in (([ff] * 3000, bpe.decode), ([1] * 3000, lambda ids: "")):
        counting = CountingDecode(decode)
        det = IncrementalDetokenizer(counting, max_pending=8)
        assert "".join(stream(det, ids)) == decode(ids)
        assert counting.longest <= 2 * 8
    assert bpe.decode([ff] * 3) == FFFD * 3


def test_incremental_tokens_straddling_characters(bpe):
    """Valid text whose every token ends inside a character has no clean boundary: the
    forced emit must not cut it (it would show U+FFFD); the text comes out once complete."""
    pieces = [b"\xe6"] + [b"\x97\xa5\xe6"] * 40 + [b"\x97\xa5"]

    def decode(ids: list[int]) -> str:
        return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")

    for max_pending in (8, 9, 16):
        out = stream(IncrementalDetokenizer(decode, max_pending=max_pending),
                     range(len(pieces)))
        assert "".join(out) == "日" * 41
        assert all(FFFD not in p for p in out)


def test_incremental_empty_tokens_inside_a_character():
    """Tokens that decode to nothing (skipped special tokens) between the bytes of a character
    push it past `max_pending`; cutting before them would show U+FFFD too early."""
    pieces = [b"a", b"\xe6", *[b""] * 20, b"\x97", b"", b"\xa5", b"b", *[b""] * 20]

    def decode(ids: list[int]) -> str:
        return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")

    counting = CountingDecode(decode)
    out = stream(IncrementalDetokenizer(counting, max_pending=8), range(len(pieces)))
    assert "".join(out) == "a日b"
    assert all(FFFD not in p for p in out)
    assert counting.longest <= 2 * 8 + 24  # trailing empty tokens are flushed, not kept


def test_max_pending_validated():
    with pytest.raises(ValueError):
        IncrementalDetokenizer(lambda ids: "", max_pending=7)
