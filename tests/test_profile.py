"""run-model profile: the memory limit is enforced where the machine allows (a real cgroup:
a child over it is OOM-killed and reported so), watched where not; a sweep on a tiny model
runs end to end with refused budgets, speed, quality beside it and llama.cpp as a peer, and
writes a report whose JSON follows the schema."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from flashinfer_ondevice.backends import installed_backends
from flashinfer_ondevice.cli import main
from flashinfer_ondevice.profiler import limits, plots, report, sweep

ALLOCATE = "import time; x = bytearray({mb} << 20); x[::4096] = b'1' * len(x[::4096]); " \
    "time.sleep(0.3)"


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_child_over_an_enforced_limit_is_reported_as_oom():
    enforcement = limits.detect()
    if not enforcement.enforced:
        pytest.skip(f"no memory limit can be enforced here: {enforcement.reason}")
    fits = limits.run_limited(python(ALLOCATE.format(mb=40)), 200 << 20, enforcement)
    assert fits.returncode == 0 and not fits.oom_killed and fits.enforced
    assert fits.cgroup_peak is not None and 40 << 20 <= fits.cgroup_peak <= 200 << 20
    over = limits.run_limited(python(ALLOCATE.format(mb=300)), 100 << 20, enforcement)
    assert over.oom_killed and over.returncode != 0
    # the profiler's cell runner turns it into a result, not an exception
    result = sweep._child({"kind": "speed"}, 20 << 20, enforcement, [], 60)
    assert result["status"] == "oom"


def test_without_enforcement_the_peak_is_watched():
    none = limits.Enforcement("none", None, "test")
    run = limits.run_limited(python(ALLOCATE.format(mb=80)), 1 << 20, none)
    assert run.returncode == 0 and not run.enforced and run.cgroup_peak is None
    assert run.watched_peak >= 80 << 20


def test_a_sweep_runs_end_to_end_and_its_report_follows_the_schema(tiny_gguf, tmp_path,
                                                                   monkeypatch):
    gguf = tiny_gguf("gemma3")
    monkeypatch.setenv("FLASHINFER_MODELS_DIR", str(tmp_path / "models"))
    out = tmp_path / "profile"
    result = CliRunner().invoke(main, ["profile", "-m", str(gguf), "--budgets", "1KB,none",
                                       "--runs", "2", "-n", "4", "--quality-tokens", "40",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "profile.json").read_text())
    report.validate(data)
    cells = {(c["system"], c["setting"], c["budget"]): c for c in data["cells"]}
    assert set(cells) == {("ours", "default", "1KB"), ("ours", "exact", "1KB"),
                          ("ours", "default", "none"), ("ours", "exact", "none"),
                          ("llama.cpp", None, "1KB"), ("llama.cpp", None, "none")}
    refused = cells["ours", "default", "1KB"]
    assert refused["status"] == "refused" and refused["smallest"] > 1000
    assert "refused: needs >=" in result.output
    ran = cells["ours", "exact", "none"]
    assert ran["status"] == "ok" and len(ran["decode_tps_runs"]) == 2
    quality = data["quality"][ran["quality_key"]]
    assert quality["tokens"] == 40 and quality["top1_agreement"] == 1.0  # exact vs exact
    assert data["quality"][cells["llama.cpp", None, "none"]["quality_key"]]["perplexity"] > 1
    assert (out / "profile.md").read_text().count("\n| ") >= 7
    if plots.available():
        for name in plots.PLOTS:
            assert (out / name).stat().st_size > 10_000, name  # a real PNG
    else:
        assert plots.INSTALL_HINT in result.output
    # quality is cached: a second sweep measures none again
    cache = json.loads((out / "quality-cache.json").read_text())
    assert set(data["quality"]) <= set(cache)


def test_bad_reports_and_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="schema"):
        report.validate({"schema": "something else"})
    good = {"schema": sweep.SCHEMA, "model": "m", "baseline": 1, "enforcement": {},
            "options": {}, "quality": {},
            "cells": [{"system": "ours", "model": "m", "budget": "1KB", "status": "ok",
                       "decode_tps": 1.0, "decode_tps_runs": [1.0], "prompt_tps": 1.0,
                       "ttft_s": 0.1, "bytes_per_token": 0.0, "peak_rss": 1,
                       "quality_key": "k"}]}
    with pytest.raises(ValueError, match="no quality"):
        report.validate(good)
    result = CliRunner().invoke(main, ["profile", "--settings", "fastest-ever"])
    assert result.exit_code != 0 and "unknown setting" in result.output
    result = CliRunner().invoke(main, ["profile", "--budgets", "lots"])
    assert result.exit_code != 0 and "invalid memory budget" in result.output
    result = CliRunner().invoke(main, ["profile", "--backend", "gpu9000"])
    assert result.exit_code != 0 and "unknown backend 'gpu9000'" in result.output
    result = CliRunner().invoke(main, ["profile", "--gpu-memory-budget", "1GB"])
    assert result.exit_code != 0 and "not 'cpu'" in result.output


def test_plan_only_predicts_without_running_cells_and_probe_caches(tiny_gguf, tmp_path,
                                                                   monkeypatch):
    gguf = tiny_gguf("llama")
    models = tmp_path / "models"
    monkeypatch.setenv("FLASHINFER_MODELS_DIR", str(models))
    result = CliRunner().invoke(main, ["probe", "-m", str(gguf)])
    assert result.exit_code == 0, result.output
    assert "64K reads,  1 in flight" in result.output and "random 4 KiB reads" in result.output
    assert len(list(models.glob("probe-*.json"))) == 1  # cached per device
    out = tmp_path / "plan"
    result = CliRunner().invoke(main, ["profile", "-m", str(gguf), "--budgets", "1KB,none",
                                       "--plan-only", "-n", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    planned = json.loads((out / "plan.json").read_text())
    cells = {(c["setting"], c["budget"]): c for c in planned["cells"]}
    assert cells["default", "1KB"]["status"] == "refused"
    ran = cells["exact", "none"]
    assert ran["status"] == "planned" and ran["predicted"]["decode_tps"] > 0
    assert ran["plan"]["streamed_bytes"] == 0 and ran["predicted"]["io_ms"] == 0
    assert "refused: needs >=" in result.output
    assert not (out / "profile.json").exists()  # nothing was run as a cell


@pytest.mark.skipif("mlx" not in installed_backends(), reason="mlx not installed")
def test_plan_only_plans_for_the_backend_and_its_device_tier(tiny_gguf, tmp_path, monkeypatch):
    """--backend mlx --gpu-memory-budget: every cell plans (and measures its compute) on mlx,
    with the device tier holding the layers and the output layer's rows."""
    gguf = tiny_gguf("gemma3")
    monkeypatch.setenv("FLASHINFER_MODELS_DIR", str(tmp_path / "models"))
    out = tmp_path / "plan"
    result = CliRunner().invoke(main, ["profile", "-m", str(gguf), "--budgets", "none",
                                       "--settings", "default", "--plan-only", "-n", "4",
                                       "--backend", "mlx", "--gpu-memory-budget", "100%",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    cells = json.loads((out / "plan.json").read_text())["cells"]
    (cell,) = [c for c in cells if c["setting"] == "default"]
    assert cell["config"]["backend"] == "mlx" and cell["config"]["gpu_memory_budget"] == "100%"
    assert cell["plan"]["device_bytes"] > 0 and cell["plan"]["head_device_rows"] > 0
    assert cell["predicted"]["decode_tps"] > 0


def test_the_tiers_setting_plans_a_tiered_store_and_is_skipped_where_convert_refuses(
        tiny_gguf, tmp_path, monkeypatch):
    """`tiers` profiles a store whose embedding is split by token, and a setting with a codec
    runs that codec's store at every budget; a model with an untied embedding (which convert
    cannot split) skips that setting with the reason, and the others still run."""
    monkeypatch.setenv("FLASHINFER_MODELS_DIR", str(tmp_path / "models"))
    for model, settings in (("gemma3", "tiers,int4"), ("llama", "default,tiers")):
        out = tmp_path / model
        result = CliRunner().invoke(main, ["profile", "-m", str(tiny_gguf(model)), "--budgets",
                                           "64MB,none", "--settings", settings, "--plan-only",
                                           "-n", "4", "--out", str(out)])
        assert result.exit_code == 0, result.output
        cells = json.loads((out / "plan.json").read_text())["cells"]
        assert all(c["status"] == "planned" for c in cells)
        planned = {c["setting"] for c in cells}
        if model == "gemma3":  # at every budget its own store, not another of the model's
            assert planned == {"tiers", "int4"} and len(cells) == 4
            for cell in cells:
                manifest = json.loads((Path(cell["config"]["store"]) / "manifest.json")
                                      .read_text())
                assert ("vocab_tiers" in manifest) == (cell["setting"] == "tiers")
                assert manifest["codec"] == ("int4" if cell["setting"] == "int4" else "bpal4")
        else:
            assert planned == {"default"}
            assert "setting tiers skipped" in result.output and "tied embedding" in result.output
    result = CliRunner().invoke(main, ["profile", "-m", str(tiny_gguf("llama")), "--budgets",
                                       "none", "--settings", "tiers", "--plan-only"])
    assert result.exit_code != 0 and "tied embedding" in result.output
