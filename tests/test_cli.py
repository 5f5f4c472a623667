"""run-model end to end: output, stats, and a one-line error (never a traceback) on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
from tiny_models import write_gguf

from flashinfer_ondevice.errors import FlashInferError

MODELS_DIR = None


@pytest.fixture(autouse=True, scope="module")
def _models_dir(tmp_path_factory):
    """Stores converted on first use go to a temporary models folder, not the checkout's."""
    global MODELS_DIR
    MODELS_DIR = tmp_path_factory.mktemp("models")


def run_model(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "FLASHINFER_MODELS_DIR": str(MODELS_DIR)}
    return subprocess.run([sys.executable, "-m", "flashinfer_ondevice.cli", *args],
                          capture_output=True, text=True, input=stdin, timeout=300, env=env)


def assert_clean_error(result: subprocess.CompletedProcess, message: str, code: int = 1):
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert message in result.stderr, result.stderr


def test_generates_and_prints_stats(tiny_gguf):
    result = run_model("-m", str(tiny_gguf("llama")), "-p", "ab", "-n", "8", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    for label in ("load time", "prompt eval", "generation", "peak memory", "tokens per second"):
        assert label in result.stderr
    again = run_model("-m", str(tiny_gguf("llama")), "-p", "ab", "-n", "8", "--seed", "3")
    assert again.stdout == result.stdout


def test_prompt_from_stdin_and_file(tiny_gguf, tmp_path):
    model = str(tiny_gguf("qwen2"))
    from_stdin = run_model("-m", model, "-p", "-", "-n", "4", "--temp", "0", stdin="abc")
    (tmp_path / "p.txt").write_text("abc")
    from_file = run_model("-m", model, "-f", str(tmp_path / "p.txt"), "-n", "4", "--temp", "0")
    assert from_stdin.returncode == from_file.returncode == 0
    assert from_stdin.stdout == from_file.stdout


@pytest.mark.slow  # a GGUF: llama.cpp's tokenizer
def test_chat_template_is_applied(tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}[assistant]"
    path = write_gguf(tmp_path / "chat.gguf", "llama", chat_template=template)
    import flashinfer_ondevice as fi

    model = fi.load(path)
    ids = model.chat_prompt_ids("hi", system_prompt="be brief")
    assert model.detokenize(ids).endswith("[system]be brief[user]hi[assistant]")
    assert ids[0] == model.tokenizer.bos_id and ids.count(model.tokenizer.bos_id) == 1
    result = run_model("-m", str(path), "-p", "hi", "-n", "3")
    assert result.returncode == 0, result.stderr


def test_missing_file():
    assert_clean_error(run_model("-m", "/nonexistent/model.gguf", "-p", "x"), "model not found")


def test_not_a_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip")
    assert_clean_error(run_model("-m", str(path), "-p", "x"), "is not a GGUF file")


@pytest.mark.parametrize("keep", [10, 100, 5000, -1000])
def test_truncated_gguf(tiny_gguf, tmp_path, keep):
    data = tiny_gguf("llama").read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[:keep])
    assert_clean_error(run_model("-m", str(path), "-p", "x"), "truncated GGUF")


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_clean_error(run_model("-m", str(path), "-p", "x"), "unsupported architecture 'mamba'")


def test_prompt_longer_than_context(tiny_gguf):
    result = run_model("-m", str(tiny_gguf("llama")), "-p", "abcdefghij" * 10, "-c", "16")
    assert_clean_error(result, "the context holds 16")


def test_context_larger_than_model(tiny_gguf):
    result = run_model("-m", str(tiny_gguf("llama")), "-p", "a", "-c", "100000")
    assert_clean_error(result, "outside 1..256")


@pytest.mark.parametrize("flags", [["--temp", "-1"], ["--top-p", "0"], ["-n", "0"],
                                   ["--top-k", "-3"], ["-t", "0"], ["--min-p", "2"]])
def test_invalid_flag_values(tiny_gguf, flags):
    result = run_model("-m", str(tiny_gguf("llama")), "-p", "a", *flags)
    assert_clean_error(result, "Invalid value", code=2)


def test_no_prompt(tiny_gguf):
    assert_clean_error(run_model("-m", str(tiny_gguf("llama"))), "no prompt", code=2)


def test_help_shows_defaults():
    result = run_model("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for flag, default in (("--temp", "0.8"), ("--top-p", "0.95"), ("--top-k", "40"),
                          ("--min-p", "0.05"), ("--max-tokens", "256")):
        option_help = text[text.index(flag):]
        assert f"default: {default}" in option_help[:200], flag


def test_memory_budget_run_prints_plan_and_io(tiny_gguf):
    result = run_model("-m", str(tiny_gguf("gemma3")), "-p", "ab", "-n", "6", "--temp", "0",
                       "--memory-budget", "60MB", "-c", "64")
    assert result.returncode == 0, result.stderr
    assert result.stderr.index("memory plan") < result.stderr.index("load time")
    assert "streamed per token" in result.stderr and "storage reads" in result.stderr
    unlimited = run_model("-m", str(tiny_gguf("gemma3")), "-p", "ab", "-n", "6", "--temp", "0")
    assert unlimited.stdout == result.stdout  # the same text whatever the budget


def test_head_plan_flag(tiny_gguf, tmp_path):
    import flashinfer_ondevice as fi
    from flashinfer_ondevice.build.convert import convert

    with pytest.raises(FlashInferError, match="head: flash-store settings"):
        fi.load(tiny_gguf("llama"), backend="reference", head="exact")
    store = convert(tiny_gguf("gemma3"), tmp_path / "g.store", head_proxy_rank=64)
    short = run_model("-m", str(store), "-p", "ab", "-n", "4", "--temp", "0", "--head",
                      "shortlist")
    assert short.returncode == 0, short.stderr
    assert "the best 1024 are computed exactly" in short.stderr
    exact = run_model("-m", str(store), "-p", "ab", "-n", "4", "--temp", "0", "--head", "exact")
    assert exact.returncode == 0 and "shortlist" not in exact.stderr
    assert short.stdout == exact.stdout  # a full-rank proxy: the same greedy text
    plain = convert(tiny_gguf("gemma3"), tmp_path / "plain.store")
    assert_clean_error(run_model("-m", str(plain), "-p", "a", "--head", "shortlist"),
                       "no output-layer proxy")


def test_impossible_budget_names_the_smallest(tiny_gguf):
    result = run_model("-m", str(tiny_gguf("llama")), "-p", "a", "--memory-budget", "1MB")
    assert_clean_error(result, "the smallest that works")


def test_convert_command_and_reuse(tiny_gguf, tmp_path):
    out = tmp_path / "llama.store"
    result = run_model("convert", str(tiny_gguf("llama")), "-o", str(out), "--codec", "int4")
    assert result.returncode == 0, result.stderr
    assert (out / "manifest.json").is_file()
    again = run_model("convert", str(tiny_gguf("llama")), "-o", str(out))
    assert_clean_error(again, "already exists")
    run = run_model("-m", str(out), "-p", "ab", "-n", "3", "--verify")
    assert run.returncode == 0, run.stderr


def test_bad_codec_spec_is_one_line(tiny_gguf, tmp_path):
    result = run_model("convert", str(tiny_gguf("llama")), "-o", str(tmp_path / "s"),
                       "--codec", "pal4,embedding=int4")
    assert result.returncode != 0
    assert "GROUP=CODEC with GROUP one of embed, attn, ffn" in result.stderr
    assert "Traceback" not in result.stderr


def test_convert_by_bits_prints_the_measurement_and_its_choice(tiny_gguf, tmp_path):
    out = tmp_path / "chosen"
    result = run_model("convert", str(tiny_gguf("gemma3")), "-o", str(out), "--bits", "6")
    assert result.returncode == 0, result.stderr
    assert "measured loss" in result.stderr and "chosen for" in result.stderr
    assert "codec_choice" in (out / "manifest.json").read_text()
    both = run_model("convert", str(tiny_gguf("gemma3")), "-o", str(tmp_path / "x"),
                     "--bits", "6", "--codec", "pal4")
    assert both.returncode != 0 and "leave out --codec" in both.stderr
    again = run_model("convert", str(tiny_gguf("gemma3")), "-o", str(out), "--bits", "6")
    assert_clean_error(again, "already exists")
    assert "measured loss" not in again.stderr  # refused before measuring, not after
    # into the models folder: named by the chosen codecs; a second run finds that store
    first = run_model("convert", str(tiny_gguf("gemma3")), "--bits", "6")
    assert first.returncode == 0, first.stderr
    second = run_model("convert", str(tiny_gguf("gemma3")), "--bits", "6")
    assert second.returncode == 0 and "the chosen codecs' store already exists" in second.stderr


def test_convert_by_bits_chooses_among_the_candidates_given(tiny_gguf, tmp_path):
    """--candidates: the measured table holds those codecs and no others (by default the
    per-row palettes are left out); unknown names are refused before any measuring, and
    the option means nothing without --bits/--target-size."""
    out = tmp_path / "chosen"
    result = run_model("convert", str(tiny_gguf("gemma3")), "-o", str(out), "--bits", "6",
                       "--candidates", "int8, pal2")
    assert result.returncode == 0, result.stderr
    measured = json.loads((out / "manifest.json").read_text())["codec_choice"]["measured"]
    assert all(set(row) == {"int8", "pal2"} for row in measured.values())
    unknown = run_model("convert", str(tiny_gguf("gemma3")), "-o", str(tmp_path / "x"),
                        "--bits", "6", "--candidates", "int8,pal5")
    assert_clean_error(unknown, "unknown codec 'pal5' among the candidates")
    alone = run_model("convert", str(tiny_gguf("gemma3")), "-o", str(tmp_path / "y"),
                      "--candidates", "int8")
    assert alone.returncode != 0 and "--candidates are for --bits" in alone.stderr


def test_corrupt_store_is_one_line(tiny_gguf, tmp_path):
    out = tmp_path / "s"
    assert run_model("convert", str(tiny_gguf("llama")), "-o", str(out)).returncode == 0
    (out / "weights.bin").write_bytes(b"\0" * 100)
    assert_clean_error(run_model("-m", str(out), "-p", "a"), "corrupt store")
