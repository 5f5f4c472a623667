"""The compact SentencePiece encoder gives llama.cpp's ids (the real Gemma 3 vocabulary on
prose, chat turns and random strings; a tiny vocabulary with a space prefix and user-defined
tokens), refuses vocabularies where it could not, and lets a budgeted session encode without
llama.cpp's vocabulary."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
from tiny_models import add_tokenizer, vocabulary

from flashinfer_ondevice.loader.gguf_header import read_header
from flashinfer_ondevice.loader.spm_encoder import SpmEncoder
from flashinfer_ondevice.loader.tokenizer import GGUFTokenizer

ROOT = Path(__file__).resolve().parents[1]
PIECES = list("abcdeXYZ .,;!?'\"\n\t  ") + [
    "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<unused7>", "[multimodal]", "\n\n",
    "   ", "é", "ß", "日本", "🤖", "\u2581", "<0x41>", "<", ">", "\r\n", "\x00", "\u200b",
    "Ａ", "\U0001F600", "the", " the", "ing", "http://", "1234567", "<s>", "</s>", "ab"]


def random_texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        if rng.random() < 0.2:  # any code points but surrogates
            text = "".join(chr(rng.choice([rng.randint(1, 0xD7FF), rng.randint(0xE000,
                                                                               0x2FFFF)]))
                           for _ in range(rng.randint(1, 20)))
        else:
            text = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 40)))
        texts.append(text)
    return texts


def assert_same_ids(encoder: SpmEncoder, reference: GGUFTokenizer, texts: list[str]) -> None:
    for text in texts:
        for add_special in (True, False):
            assert encoder.encode(text, add_special) == reference.encode(text, add_special), \
                (text[:60], add_special)


def test_gemma_vocabulary_encodes_as_llama_cpp(gemma_path):
    encoder = SpmEncoder.for_vocabulary(read_header(gemma_path))
    assert encoder is not None and encoder.nbytes() < 10 << 20
    texts = [p.read_text() for p in sorted((ROOT / "data" / "eval").glob("*.txt"))]
    texts += [p.read_text() for p in sorted((ROOT / "flashinfer_ondevice" / "data")
                                            .glob("*.txt"))]
    texts += ["", " ", "  leading", "trailing  ", "a" * 500, "\n" * 40, "\t\t\t \t",
              "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
              "<bos><bos>x", "<unused12> <unused123>x", "[multimodal]<start_of_image>"]
    assert_same_ids(encoder, GGUFTokenizer(gemma_path), texts + random_texts(600))


def write_vocabulary(path: Path, extra: list[tuple[str, int]], model: str = "llama",
                     space_prefix: bool | None = None) -> Path:
    """A GGUF holding only a tokenizer: the tiny vocabulary plus `extra` (text, type) tokens
    and a few merged pieces, so merges are chosen by score (and, for "aaa", by position)."""
    tokens, scores, types = vocabulary()
    merged = ["\u2581ab", "ab", "bc", "abc", "\u2581the", "th", "he", "the", "aa"]
    tokens += merged + [text for text, _ in extra]
    scores += [-0.5 * (i + 1) for i in range(len(merged))] + [0.0] * len(extra)
    types += [1] * len(merged) + [kind for _, kind in extra]
    writer = gguf.GGUFWriter(str(path), "llama")
    add_tokenizer(writer, tokens, scores, types, model)
    if space_prefix is not None:
        writer.add_add_space_prefix(space_prefix)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


@pytest.mark.slow
@pytest.mark.parametrize("space_prefix", [None, False])
def test_tiny_vocabulary_encodes_as_llama_cpp(tmp_path, space_prefix):
    path = write_vocabulary(tmp_path / "vocab.gguf", [("\n", 4), ("\n\n", 4), ("<t>", 3)],
                            space_prefix=space_prefix)
    encoder = SpmEncoder.for_vocabulary(read_header(path))
    assert encoder is not None
    texts = ["abc the thebc", " ab  abc\n\nx<t>the", "<t> ab", "é日本 <s>ab</s>", "aaa aaaaa"]
    assert_same_ids(encoder, GGUFTokenizer(path), texts + random_texts(300, seed=1))


def test_vocabularies_it_cannot_match_are_refused(tmp_path):
    overlapping = write_vocabulary(tmp_path / "overlap.gguf", [("<x|", 4), ("|y>", 4)])
    assert SpmEncoder.for_vocabulary(read_header(overlapping)) is None
    self_overlap = write_vocabulary(tmp_path / "runs.gguf", [("\n\n", 4), ("  ", 4)])
    assert SpmEncoder.for_vocabulary(read_header(self_overlap)) is not None
    bpe = write_vocabulary(tmp_path / "bpe.gguf", [], model="gpt2")
    assert SpmEncoder.for_vocabulary(read_header(bpe)) is None


BUDGETED_CHILD = """
import json, sys
from flashinfer_ondevice.loader import tokenizer
from flashinfer_ondevice.runtime import engine
loaded = []
class Counted(tokenizer.GGUFTokenizer):
    def __init__(self, *args):
        loaded.append(1)
        super().__init__(*args)
engine.GGUFTokenizer = Counted
session = engine.open_store_session(sys.argv[1], memory_budget="60%", ctx_size=256)
print(json.dumps({"lean": isinstance(session.tokenizer, tokenizer.LeanGGUFTokenizer),
                  "transient": session.plan.transient_bytes, "llama_vocab_loads": len(loaded),
                  "ids": session.tokenizer.encode(sys.argv[2])}))
"""


def _open_budgeted(store: Path, text: str) -> dict:
    child = subprocess.run([sys.executable, "-c", BUDGETED_CHILD, str(store), text],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    return json.loads(child.stdout)


def test_budgeted_session_encodes_without_llama_cpp_vocabulary(gemma_store, tmp_path):
    """In a fresh process, as a user opens it (a budget counts the memory the process gained
    since it started, so this runs apart from the tests' own). Convert recorded that the
    compact encoder matches llama.cpp, so the open loads no llama.cpp vocabulary; a store
    without that record (converted before it) loads it to check at open."""
    text = "<start_of_turn>user\nWhat is  a flash store?<end_of_turn>\n"
    manifest = json.loads((gemma_store / "manifest.json").read_text())
    assert manifest["tokenizer"]["compact_encoder"] is True
    opened = _open_budgeted(gemma_store, text)
    assert opened["lean"] and opened["transient"] == 0 and opened["llama_vocab_loads"] == 0
    expected = GGUFTokenizer(gemma_store / "tokenizer.gguf").encode(text)
    assert opened["ids"] == expected
    old = tmp_path / "old"  # the same files (hard links), the record as before
    shutil.copytree(gemma_store, old, copy_function=os.link)
    (old / "manifest.json").unlink()
    del manifest["tokenizer"]["compact_encoder"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    checked = _open_budgeted(old, text)
    assert checked["lean"] and checked["transient"] == 0 and checked["llama_vocab_loads"] == 1
    assert checked["ids"] == expected


def test_a_hostile_compact_encoder_record_is_refused(tiny_gguf, tmp_path):
    from flashinfer_ondevice.build.convert import convert
    from flashinfer_ondevice.runtime.engine import open_store_session
    from flashinfer_ondevice.store.reader import StoreError

    path = convert(tiny_gguf("llama"), tmp_path / "store", "int8")
    manifest = json.loads((path / "manifest.json").read_text())
    assert type(manifest["tokenizer"]["compact_encoder"]) is bool
    manifest["tokenizer"]["compact_encoder"] = 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="compact_encoder"):
        open_store_session(path, memory_budget="60%", ctx_size=64)

