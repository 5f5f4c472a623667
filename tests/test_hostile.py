"""The hostile-input corpus (hostile_corpus.py), every case in a child process under limits.

Every case must end as it expects: bad input exits non-zero with one line naming the cause
(no traceback, no control characters), good input exits 0 with the right output; no case may
abort, hang (hostile_runner.TIME_LIMIT) or blow up memory (hostile_runner.MEMORY_LIMIT). The
cases run two at a time, once per session; each test asserts one case's verdict.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hostile_corpus import Case, all_cases, make_bases
from hostile_runner import command_for, run, verdict

CASES = all_cases()
pytestmark = pytest.mark.slow  # the GGUF cases need llama.cpp (tokenizer)


def _run_case(case: Case, bases, root: Path):
    folder = root / case.name
    folder.mkdir()
    env = {**os.environ, "FLASHINFER_MODELS_DIR": str(folder / "models"),
           "XDG_CACHE_HOME": str(root / "cache"), "PYTHONWARNINGS": "ignore",
           **{k: v.format(folder=folder) for k, v in case.env}}
    args = case.build(bases, folder)
    return run(command_for(case.kind, args), folder, env, case.stdin)


@pytest.fixture(scope="session")
def outcomes(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    bases = make_bases(root / "bases")
    (root / "cases").mkdir()
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {c.name: pool.submit(_run_case, c, bases, root / "cases") for c in CASES}
        return {name: future.result() for name, future in futures.items()}


def test_corpus_size():
    by_category: dict[str, int] = {}
    for case in CASES:
        by_category[case.category] = by_category.get(case.category, 0) + 1
    assert len(CASES) >= 150, by_category
    assert len(by_category) >= 8


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(case: Case, outcomes):
    outcome = outcomes[case.name]
    problem = verdict(outcome, case.expect, case.cause)
    assert problem is None, f"{case.name}: {problem}"
