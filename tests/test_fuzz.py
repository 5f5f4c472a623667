"""The parsers' fuzzers (fuzz_parsers.py) at a fixed seed: 5,000 mutated inputs per parser.

Only the project's own errors may escape a parser, and llama.cpp must load every vocabulary
our checks accept without dying. A longer run: `python tests/fuzz_parsers.py --cases 20000`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CASES, SEED = 5000, 20261203


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """The fuzzers' reports, from a process of their own (the session's memory stays as the
    memory-budget tests expect it)."""
    out = tmp_path_factory.mktemp("fuzz") / "reports.json"
    subprocess.run([sys.executable, str(Path(__file__).parent / "fuzz_parsers.py"),
                    "--cases", str(CASES), "--seed", str(SEED), "--json", str(out)],
                   stdout=subprocess.DEVNULL)
    return {r["target"]: r for r in json.loads(out.read_text())}


@pytest.mark.slow  # the vocabulary fuzzer hands what it accepts to llama.cpp
@pytest.mark.parametrize("target", ["gguf", "manifest", "safetensors", "config.json",
                                    "vocabulary"])
def test_only_our_errors_escape(reports, target):
    report = reports[target]
    print(target, report["cases"], report["outcomes"])
    assert report["cases"] >= CASES * 0.95  # the vocabulary writer may refuse a few mutations
    assert not report["escaped"], "\n".join(report["escaped"][:10])
    # a fuzzer that only ever hits the first check would prove little
    assert len(report["outcomes"]) >= 2, report["outcomes"]
