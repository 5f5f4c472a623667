"""The memory promise under a real limit: shared/tools/memlimit, page cache counted, cold.

run-model on the real Gemma 3 270M store at a 50% budget, with limit = budget + the
interpreter's baseline, must finish a 64-token generation without an OOM kill, and its
peak resident memory must stay within budget + baseline.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

MEMLIMIT = Path(__file__).resolve().parents[2] / "shared" / "tools" / "memlimit"


def test_run_model_within_50_percent_budget_under_memlimit(gemma_store):
    assert MEMLIMIT.is_file(), f"{MEMLIMIT} is missing"
    baseline = int(subprocess.check_output(
        [sys.executable, "-c", "from flashinfer_ondevice.runtime.engine import process_baseline; "
         "print(process_baseline())"]))
    budget = (gemma_store / "weights.bin").stat().st_size // 2
    limit = budget + baseline
    run_model = shutil.which("run-model") or str(Path(sys.executable).parent / "run-model")
    result = subprocess.run(
        [str(MEMLIMIT), str(limit), "--cold", str(gemma_store), "--", run_model, "-m",
         str(gemma_store), "--memory-budget", "50%", "-n", "64", "--temp", "0", "-p",
         "The capital of France is"], capture_output=True, text=True, timeout=600)
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
