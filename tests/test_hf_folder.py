"""Hugging Face folders load into the same model as the equivalent GGUF."""

import dataclasses
import json

import numpy as np
import pytest
from tiny_models import write_gguf, write_hf_folder

import flashinfer_ondevice as fi
from flashinfer_ondevice.errors import ModelFileError
from flashinfer_ondevice.loader import load_checkpoint
from flashinfer_ondevice.model import reference_engine


@pytest.mark.slow  # a GGUF: llama.cpp's tokenizer
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_hf_folder_equals_gguf(arch, tmp_path):
    gguf_model = load_checkpoint(write_gguf(tmp_path / "m.gguf", arch))
    hf_model = load_checkpoint(write_hf_folder(tmp_path / "hf", arch))
    eps = gguf_model.config.norm_eps  # stored as float32 in GGUF
    assert hf_model.config.norm_eps == pytest.approx(eps, rel=1e-6)
    assert dataclasses.replace(hf_model.config, norm_eps=eps) == gguf_model.config
    ids = [1, *range(5, 60)]
    # Same float arithmetic on both (the GGUF path otherwise mimics llama.cpp's roundings).
    logits = []
    for checkpoint in (gguf_model, hf_model):
        engine = reference_engine(checkpoint.config, checkpoint.weights)
        logits.append(engine.forward(np.array(ids), engine.new_cache(64), True))
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5, atol=1e-5)
    assert hf_model.tokenizer.eog_ids == {2}
    assert hf_model.tokenizer.encode("\u2581a \u2581b", add_special=False) == [259, 260]


def test_hf_folder_runs_from_a_store_as_the_reference(tmp_path):
    """load() converts a folder into a store and runs it with the fused kernels; its logits
    stay within the int8 codec's error of the float32 reference on the folder."""
    folder = write_hf_folder(tmp_path / "hf", "llama")
    ids = [1, *range(5, 40)]
    store = fi.load(folder, codec="int8").logits(ids)
    reference = fi.load(folder, backend="reference").logits(ids)
    assert np.abs(store - reference).max() <= 0.05 * np.abs(reference).max()
    assert (store.argmax(1) == reference.argmax(1)).mean() >= 0.9


def test_hf_index_cannot_name_files_outside_the_folder(tmp_path):
    folder = write_hf_folder(tmp_path / "hf", "llama")
    index = {"weight_map": {"model.embed_tokens.weight": "../../etc/passwd"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFileError, match="outside the folder"):
        fi.load(folder)


def test_corrupt_safetensors_header(tmp_path):
    folder = write_hf_folder(tmp_path / "hf", "llama")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes((10**12).to_bytes(8, "little") + data[8:])
    with pytest.raises(ModelFileError, match="header length"):
        fi.load(folder)


def test_truncated_safetensors(tmp_path):
    folder = write_hf_folder(tmp_path / "hf", "llama")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ModelFileError, match="outside the file"):
        fi.load(folder)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelFileError, match="config.json"):
        fi.load(tmp_path)
