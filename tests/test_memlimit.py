"""The memory promise under a real limit: shared/tools/memlimit, page cache counted, cold.

run-model on the real Gemma 3 270M store at a 50% budget, with limit = budget + the
process's baseline, must finish a 64-token generation without an OOM kill, and its peak
resident memory must stay within budget + baseline; and a generation that fills the whole
default context (1024 tokens: the KV cache at its planned size) must finish the same way.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MEMLIMIT = Path(__file__).resolve().parents[2] / "shared" / "tools" / "memlimit"


def run_limited(store: Path, *args: str,
                budget: int | None = None) -> tuple[subprocess.CompletedProcess, int]:
    """run-model at a budget (default 50% of the store) under memlimit with limit = budget +
    baseline."""
    assert MEMLIMIT.is_file(), f"{MEMLIMIT} is missing"
    baseline = int(subprocess.check_output(
        [sys.executable, "-c", "from flashinfer_ondevice.runtime.engine import "
         "process_baseline; print(process_baseline())"]))
    if budget is None:
        budget = (store / "weights.bin").stat().st_size // 2
    limit = budget + baseline
    run_model = shutil.which("run-model") or str(Path(sys.executable).parent / "run-model")
    result = subprocess.run(
        [str(MEMLIMIT), str(limit), "--cold", str(store), "--", run_model, "-m", str(store),
         "--memory-budget", str(budget), *args], capture_output=True, text=True, timeout=900)
    return result, limit


def test_run_model_within_50_percent_budget_under_memlimit(gemma_store):
    result, limit = run_limited(gemma_store, "-n", "64", "--temp", "0", "-p",
                                "The capital of France is")
    baseline = limit - (gemma_store / "weights.bin").stat().st_size // 2
    budget = limit - baseline
    report = re.search(r"memlimit: rc=(\d+) limit=(\d+) peak=(\d+) oom_kills=(\d+)",
                       result.stderr)
    assert report, result.stderr
    assert int(report.group(1)) == 0 and int(report.group(4)) == 0, result.stderr
    assert "63 tokens" in result.stderr  # 64 generated: the first comes from the prefill
    peak = re.search(r"peak memory += +([\d.]+) MiB", result.stderr)
    peak_bytes = float(peak.group(1)) * (1 << 20)
    print(f"limit {limit / 1e6:.1f} MB (budget {budget / 1e6:.1f} + baseline "
          f"{baseline / 1e6:.1f}); process peak {peak_bytes / 1e6:.1f} MB; cgroup peak "
          f"{int(report.group(3)) / 1e6:.1f} MB (page cache included)")
    assert peak_bytes <= limit


def test_a_generation_filling_the_default_context_stays_within_the_limit(gemma_store, tmp_path):
    """~900 prompt tokens, then generation until the 1024-token context is full: the KV cache
    reaches its planned size (float16) and the process still fits the limit."""
    from flashinfer_ondevice.loader.tokenizer import GGUFTokenizer

    tokenizer = GGUFTokenizer(gemma_store / "tokenizer.gguf")
    text = (Path(__file__).resolve().parents[1] / "data" / "eval" / "apache-2.0.txt").read_text()
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(tokenizer.decode(tokenizer.encode(text, add_special=False)[:900]))
    result, limit = run_limited(gemma_store, "-f", str(prompt), "--no-chat-template",
                                "-n", "1024", "--temp", "0.7", "--seed", "3")
    report = re.search(r"memlimit: rc=(\d+) limit=(\d+) peak=(\d+) oom_kills=(\d+)",
                       result.stderr)
    assert report, result.stderr
    assert int(report.group(1)) == 0 and int(report.group(4)) == 0, result.stderr
    prompt_tokens = int(re.search(r"prompt eval .*/ +(\d+) tokens", result.stderr).group(1))
    generated = int(re.search(r"generation .*/ +(\d+) tokens", result.stderr).group(1))
    assert "finish        = length" in result.stderr, result.stderr[-500:]
    assert prompt_tokens + generated + 2 >= 1024  # the context is full
    peak = float(re.search(r"peak memory += +([\d.]+) MiB", result.stderr).group(1))
    assert peak * (1 << 20) <= limit


@pytest.mark.parametrize("cache_type", ["f16", "q8"])
def test_a_long_prompt_stays_within_the_limit(gemma_store, tmp_path, cache_type):
    """An 8,000-token prompt in an 8,192-token context at the same 50% budget: the planner
    sizes the prompt batches (and reserves the KV cache of the context, by type), so the
    long prompt fits the limit a short one does."""
    from flashinfer_ondevice.loader.tokenizer import GGUFTokenizer

    tokenizer = GGUFTokenizer(gemma_store / "tokenizer.gguf")
    text = (Path(__file__).resolve().parents[1] / "data" / "eval" / "apache-2.0.txt").read_text()
    ids = tokenizer.encode(text * 5, add_special=False)[:8000]
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(tokenizer.decode(ids))
    result, limit = run_limited(gemma_store, "-f", str(prompt), "--no-chat-template",
                                "-c", "8192", "--cache-type", cache_type, "-n", "8",
                                "--temp", "0")
    report = re.search(r"memlimit: rc=(\d+) limit=(\d+) peak=(\d+) oom_kills=(\d+)",
                       result.stderr)
    assert report, result.stderr
    assert int(report.group(1)) == 0 and int(report.group(4)) == 0, result.stderr[-2000:]
    assert f"KV cache ({cache_type})" in result.stderr
    prompt_tokens = int(re.search(r"prompt eval .*/ +(\d+) tokens", result.stderr).group(1))
    assert prompt_tokens >= 7990
    batch = re.search(r"prompt batches of (\d+) tokens", result.stderr).group(1)
    peak = float(re.search(r"peak memory += +([\d.]+) MiB", result.stderr).group(1))
    print(f"{cache_type}: {prompt_tokens}-token prompt in batches of {batch}: process peak "
          f"{peak * (1 << 20) / 1e6:.1f} MB, cgroup peak {int(report.group(3)) / 1e6:.1f} MB, "
          f"limit {limit / 1e6:.1f} MB")
    assert peak * (1 << 20) <= limit


SMALLEST_CHILD = """
import sys
from flashinfer_ondevice.runtime.engine import open_store_session
from flashinfer_ondevice.runtime.planner import BudgetError
try:
    open_store_session(sys.argv[1], memory_budget=1, ctx_size=int(sys.argv[2]))
except BudgetError as error:
    print(error.smallest)
"""


def test_a_context_whose_kv_cache_does_not_fit_spills_within_the_limit(gemma_store, tmp_path):
    """An 8,192-token context at a budget 4 MB above the smallest that works (the whole KV
    cache does not fit it): global layers spill their oldest positions to a file next to
    the store; a 3,600-token prompt and 16 tokens run within the limit, the spilled KV is
    read back every token, and no spill file is left behind."""
    from flashinfer_ondevice.loader.tokenizer import GGUFTokenizer

    ctx = 8192
    smallest = int(subprocess.check_output([sys.executable, "-c", SMALLEST_CHILD,
                                            str(gemma_store), str(ctx)], text=True))
    tokenizer = GGUFTokenizer(gemma_store / "tokenizer.gguf")
    text = (Path(__file__).resolve().parents[1] / "data" / "eval" / "apache-2.0.txt").read_text()
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(tokenizer.decode(tokenizer.encode(text * 2, add_special=False)[:3600]))
    before = sorted(gemma_store.parent.iterdir())
    result, limit = run_limited(gemma_store, "-f", str(prompt), "--no-chat-template",
                                "-c", str(ctx), "-n", "16", "--temp", "0",
                                budget=smallest + (4 << 20))
    report = re.search(r"memlimit: rc=(\d+) limit=(\d+) peak=(\d+) oom_kills=(\d+)",
                       result.stderr)
    assert report, result.stderr
    assert int(report.group(1)) == 0 and int(report.group(4)) == 0, result.stderr[-2000:]
    resident = int(re.search(r"KV spill: global layers keep their last (\d+) positions",
                             result.stderr).group(1))
    assert resident < 3600
    spill = float(re.search(r"KV spill += +([\d.]+) MB read back per token",
                            result.stderr).group(1))
    assert spill > 0
    assert sorted(gemma_store.parent.iterdir()) == before
    peak = float(re.search(r"peak memory += +([\d.]+) MiB", result.stderr).group(1))
    print(f"KV spill: {resident} positions resident per global layer, {spill:.1f} MB read "
          f"back per token; process peak {peak * (1 << 20) / 1e6:.1f} MB, cgroup peak "
          f"{int(report.group(3)) / 1e6:.1f} MB, limit {limit / 1e6:.1f} MB")
    assert peak * (1 << 20) <= limit
