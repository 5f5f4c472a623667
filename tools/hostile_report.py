"""Run the hostile-input corpus and the parser fuzzers; write a table and JSON of the outcomes.

    python tools/hostile_report.py                      # corpus + 2,000 fuzz cases per parser
    python tools/hostile_report.py --fuzz-cases 20000 --seed 7 --out docs/hostile

The same checks as tests/test_hostile.py and tests/test_fuzz.py, summed up: corpus cases by
category and expected outcome with how many ended as expected, the slowest case and the
largest peak RSS; fuzz cases per parser by outcome. Exit status 1 if anything failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fuzz_parsers import run_all  # noqa: E402
from hostile_suite import run_corpus  # noqa: E402


def corpus_table(results: list[dict]) -> str:
    rows: dict[str, dict] = defaultdict(lambda: defaultdict(int))
    for r in results:
        row = rows[r["category"]]
        row[r["expect"]] += 1
        row["as expected"] += r["problem"] is None
        row["max s"] = max(row["max s"], r["seconds"])
        row["max MiB"] = max(row["max MiB"], r["peak_rss_mib"])
    lines = ["| category | cases | expect error | expect ok | as expected | slowest (s) | "
             "peak RSS (MiB) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in sorted(rows.items()):
        lines.append(f"| {name} | {row['error'] + row['ok']} | {row['error']} | {row['ok']} | "
                     f"{row['as expected']} | {row['max s']:.1f} | {row['max MiB']} |")
    total = len(results)
    good = sum(r["problem"] is None for r in results)
    lines.append(f"| **all** | {total} | {sum(r['expect'] == 'error' for r in results)} | "
                 f"{sum(r['expect'] == 'ok' for r in results)} | {good} | "
                 f"{max(r['seconds'] for r in results):.1f} | "
                 f"{max(r['peak_rss_mib'] for r in results)} |")
    return "\n".join(lines)


def fuzz_table(reports) -> str:
    kinds = sorted({k for r in reports for k in r.outcomes})
    lines = ["| parser | cases | " + " | ".join(kinds) + " | escaped |",
             "|---|---:|" + "---:|" * (len(kinds) + 1)]
    for r in reports:
        cells = " | ".join(str(r.outcomes.get(k, 0)) for k in kinds)
        lines.append(f"| {r.target} | {r.cases} | {cells} | {len(r.escaped)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fuzz-cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=20261203)
    parser.add_argument("--workers", type=int, default=2, help="corpus cases at a time")
    parser.add_argument("--out", type=Path, default=Path("hostile-report"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        start = time.monotonic()
        results = run_corpus(Path(work) / "corpus", args.workers)
        corpus_seconds = time.monotonic() - start
        start = time.monotonic()
        reports = run_all(args.fuzz_cases, args.seed, Path(work) / "fuzz")
        fuzz_seconds = time.monotonic() - start
    failed = [r for r in results if r["problem"]]
    text = (f"# Hostile input: corpus and fuzzers\n\nCorpus ({corpus_seconds:.0f} s, "
            f"{args.workers} at a time):\n\n{corpus_table(results)}\n\nFuzzers (seed "
            f"{args.seed}, {fuzz_seconds:.0f} s):\n\n{fuzz_table(reports)}\n")
    if failed:
        text += "\nFailed cases:\n\n" + "\n".join(f"* {r['name']}: {r['problem']}"
                                                   for r in failed) + "\n"
    escaped = [e for r in reports for e in r.escaped]
    if escaped:
        text += "\nEscaped from the fuzzers:\n\n" + "\n".join(f"* {e}" for e in escaped) + "\n"
    (args.out / "report.md").write_text(text)
    (args.out / "report.json").write_text(json.dumps({
        "corpus": results, "corpus_seconds": corpus_seconds, "fuzz_seed": args.seed,
        "fuzz": [{"target": r.target, "cases": r.cases, "outcomes": dict(r.outcomes),
                  "escaped": r.escaped} for r in reports]}, indent=1))
    print(text)
    return 1 if failed or escaped else 0


if __name__ == "__main__":
    sys.exit(main())
