"""The README's first lines are the newcomer's path, and CI runs exactly its test command."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_ci_runs_the_readmes_test_command():
    setup_and_run, setup_and_test = readme_commands()[:2]
    assert setup_and_test.endswith("&& python -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert setup_and_test in ci
    # both set up the same portable llama.cpp build
    install = setup_and_test.split(" pip install")[0]
    assert setup_and_run.startswith(install) and "GGML_NATIVE=OFF" in install
