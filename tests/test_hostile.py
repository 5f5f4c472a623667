"""The hostile-input corpus (hostile_corpus.py), every case in a child process under limits.

Every case must end as it expects: bad input exits non-zero with one line naming the cause
(no traceback, no control characters), good input exits 0 with the right output; no case may
abort, hang (hostile_runner.TIME_LIMIT) or blow up memory (hostile_runner.MEMORY_LIMIT). The
cases run two at a time, once per session; each test asserts one case's verdict.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hostile_corpus import Case, all_cases

CASES = all_cases()
pytestmark = pytest.mark.slow  # the GGUF cases need llama.cpp (tokenizer)


@pytest.fixture(scope="session")
def outcomes(tmp_path_factory):
    """Every case's verdict, from hostile_suite.py in a process of its own (see why there)."""
    root = tmp_path_factory.mktemp("hostile")
    results = root / "results.json"
    subprocess.run([sys.executable, str(Path(__file__).parent / "hostile_suite.py"),
                    str(root / "work"), str(results)], check=True)
    return {r["name"]: r for r in json.loads(results.read_text())}


def test_corpus_size():
    by_category: dict[str, int] = {}
    for case in CASES:
        by_category[case.category] = by_category.get(case.category, 0) + 1
    assert len(CASES) >= 150, by_category
    assert len(by_category) >= 8


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(case: Case, outcomes):
    result = outcomes[case.name]
    assert result["problem"] is None, f"{case.name}: {result['problem']}"
