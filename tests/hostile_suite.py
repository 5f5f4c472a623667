"""Run every case of the hostile corpus and write the verdicts as JSON.

    python tests/hostile_suite.py WORK_FOLDER RESULTS.json [--workers 2]

Runs as a small process of its own: a child's peak RSS is read from the kernel's accounting
(wait4), which, for a child started by vfork/exec, starts at its parent's peak, so the cases
must not be started from a big process such as a pytest session that loaded a real model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from hostile_corpus import Case, all_cases, make_bases  # noqa: E402
from hostile_runner import command_for, run, verdict  # noqa: E402


def run_corpus(work: Path, workers: int = 2) -> list[dict]:
    """Every case's verdict (None: as expected), category, time and peak RSS."""
    bases = make_bases(work / "bases")

    def one(case: Case) -> dict:
        folder = work / "cases" / case.name
        folder.mkdir(parents=True)
        env = {**os.environ, "FLASHINFER_MODELS_DIR": str(folder / "models"),
               "XDG_CACHE_HOME": str(work / "cache"), "PYTHONWARNINGS": "ignore",
               **{k: v.format(folder=folder) for k, v in case.env}}
        outcome = run(command_for(case.kind, case.build(bases, folder)), folder, env,
                      case.stdin)
        return {"name": case.name, "category": case.category, "expect": case.expect,
                "problem": verdict(outcome, case.expect, case.cause),
                "seconds": round(outcome.seconds, 2), "peak_rss_mib": outcome.peak_rss >> 20,
                "exit": outcome.returncode}

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, all_cases()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("results", type=Path)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    results = run_corpus(args.work, args.workers)
    args.results.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
