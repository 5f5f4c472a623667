"""The profile sweep: every (setting, budget) cell and every peer at every budget, each run in
a fresh child under its memory limit (limits.py), then quality once per configuration the
cells ran with (cached in the output folder), assembled into one result (report.py renders
and checks it).

Budgets are bytes above the process's baseline; a percentage is of the model file's bytes
(the source GGUF), so every system, ours and the peers, gets the same absolute limit:
budget + baseline. "none" runs without a budget or limit.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from tqdm import tqdm

from ..api import store_path_for
from ..errors import FlashInferError
from ..runtime.planner import parse_budget
from ..store.reader import is_store
from . import probe
from .limits import ChildRun, Enforcement, run_limited

SCHEMA = "flashinfer-ondevice-profile/1"
# what each setting passes to load(); "default" is what run-model does unasked
SETTINGS = {
    "default": {},
    "exact": {"head": "exact", "quality": "exact"},
    "shortlist": {"head": "shortlist"},
    "kv-q8": {"cache_type": "q8"},
    "int4": {"codec": "int4"},
    "int4fit": {"codec": "int4fit"},  # int4 fitted to calibration data (12 min to convert)
    # the tied embedding in two tiers (store/vocab_tiers.py): our best quality per byte
    # (docs/benchmarks.md); 12 min to convert; a model whose convert refuses it (an untied
    # embedding) skips the setting
    "tiers": {"codec": "bpal4,embed=bpal4@12.5%/bpal2"},
    # needs a store calibrated for sparsity (run-model convert MODEL --calibrate); the cell
    # says so where it is not
    "sparse": {"selector": "predicted"},
}
DEFAULT_SETTINGS = ("default", "exact")
QUALITY_TEXT = "heldout-mpl-2.0.txt"  # package data, never the calibration text
CTX = 512  # context of every cell and of quality's chunks (or the model's, if smaller)
PROMPT_TOKENS = 64  # prompt of a speed cell
UNLIMITED = Enforcement("none", None, "not measured for memory")
TRACE_POINTS = 200  # samples of memory over time kept per cell (its first run)


@dataclass
class SweepOptions:
    model: Path  # GGUF (or folder/store) ours runs
    budgets: list[str]
    settings: list[str]
    peers: list[Path] = field(default_factory=list)  # GGUFs llama.cpp runs
    quality_text: Path | None = None
    quality_tokens: int = 1024
    n: int = 32
    prompt_tokens: int = PROMPT_TOKENS
    runs: int = 3
    threads: int = 2
    ctx: int = CTX
    out: Path = Path("profile")
    timeout: float = 900.0
    backend: str = "cpu"  # what computes in our cells (load()'s backend)
    gpu_memory_budget: str | None = None  # its device tier, where it has one

    def load_arguments(self, setting: str) -> dict:
        """load()'s arguments for a cell of `setting`: the setting's, and the backend's (a
        setting's codec is in the store the cell runs: model_for)."""
        extra: dict = {} if self.backend == "cpu" else {"backend": self.backend}
        if self.gpu_memory_budget is not None:
            extra["gpu_memory_budget"] = self.gpu_memory_budget
        own = {k: v for k, v in SETTINGS[setting].items() if k != "codec"}
        return {**own, **extra}

    def model_for(self, setting: str) -> Path:
        """What a cell of `setting` loads: a setting with a codec runs that codec's store
        (the CLI converted it), so a budget chooses only how that store runs, never another
        of the model's stores (load() weighs those when given the source)."""
        codec = SETTINGS[setting].get("codec")
        if codec is None or is_store(self.model):
            return self.model
        return store_path_for(self.model, codec)


def default_quality_text() -> Path:
    return Path(str(resources.files("flashinfer_ondevice.data") / QUALITY_TEXT))


def parse_settings(text: str) -> list[str]:
    if text == "default":
        return list(DEFAULT_SETTINGS)
    if text == "all":
        return list(SETTINGS)
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown or not names:
        raise FlashInferError(f"unknown setting(s) {', '.join(unknown) or text!r} (use "
                              f"default, all or a list of {', '.join(SETTINGS)})")
    return names


def _model_bytes(model: Path) -> int:
    """What a percentage budget is a percentage of: the model file (or folder)'s bytes."""
    if model.is_file():
        return model.stat().st_size
    return sum(p.stat().st_size for p in model.rglob("*") if p.is_file())


def budget_bytes(text: str, model_bytes: int) -> int | None:
    return None if text.strip().lower() == "none" else parse_budget(text, model_bytes)


def _child(spec: dict, limit: int | None, enforcement: Enforcement, cold: list[Path],
           timeout: float | None) -> dict:
    """Run one cell under `limit`: its JSON result, or a status saying how it ended, with the
    memory it took (peaks, and a trace of its first TRACE_POINTS samples' worth)."""
    run = run_limited(_command(spec), limit, enforcement, cold, timeout)
    result = _outcome(run, limit, timeout)
    result["cgroup_peak"] = run.cgroup_peak
    result["watched_peak"] = run.watched_peak
    step = max(1, len(run.trace) // TRACE_POINTS)
    result["memory_trace"] = [list(sample) for sample in run.trace[::step]]
    return result


def _command(spec: dict) -> list[str]:
    return [sys.executable, "-m", "flashinfer_ondevice.profiler.cell", json.dumps(spec)]


def _unlimited(spec: dict, timeout: float | None) -> dict:
    """Run a cell that is not measured for memory (quality, compute rate, plan)."""
    run = run_limited(_command(spec), None, UNLIMITED, [], timeout)
    return _outcome(run, None, timeout)


def _outcome(run: ChildRun, limit: int | None, timeout: float | None) -> dict:
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode == 0 and lines:
        return json.loads(lines[-1])
    if run.oom_killed:
        return {"status": "oom", "message": f"killed by the {limit}-byte limit"}
    if run.returncode is None:
        return {"status": "timeout", "message": f"no result within {timeout:.0f} s"}
    said = [line for line in run.stderr.splitlines() if line.strip()]
    return {"status": "error", "message": said[-1][-300:] if said else
            f"exit status {run.returncode}"}


def _prompt(options: SweepOptions) -> tuple[Path, dict]:
    """The held-out text, and what every speed or compute cell is asked to run on it."""
    text = options.quality_text or default_quality_text()
    return text, {"prompt_file": str(text), "prompt_tokens": options.prompt_tokens,
                  "n": options.n, "threads": options.threads, "ctx": options.ctx}


def _median(runs: list[dict]) -> dict:
    """One cell's runs: medians and spreads where they ran, else the first failure."""
    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        return runs[0]
    cell = dict(ok[0])
    for key in ("decode_tps", "prompt_tps", "ttft_s", "bytes_per_token", "io_wait_ms",
                "cache_ms", "compute_ms", "kv_spill_per_token"):
        if key in cell:
            cell[key] = statistics.median(r[key] for r in ok)
    cell["decode_tps_runs"] = [r["decode_tps"] for r in ok]
    cell["memory_trace"] = ok[0].get("memory_trace", [])
    cell["peak_rss"] = max(r["peak_rss"] for r in ok)
    peaks = [r["cgroup_peak"] for r in ok if r.get("cgroup_peak") is not None]
    cell["cgroup_peak"] = max(peaks) if peaks else None
    return cell


def _config_key(config: dict, text: Path, tokens: int, ctx: int) -> str:
    digest = hashlib.sha256(text.read_bytes()).hexdigest()[:16]
    blob = json.dumps([config, digest, tokens, ctx], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def sweep(options: SweepOptions, enforcement: Enforcement, baseline: int,
          reference: Path, progress: bool = True, storage: dict | None = None) -> dict:
    """Run the whole profile; `reference`: the exact model's store quality is measured
    against; `storage`: the probe (probe.py), for a prediction beside each measured cell.
    Returns the result (report.py's schema)."""
    options.out.mkdir(parents=True, exist_ok=True)
    model_bytes = _model_bytes(options.model)
    text, prompt = _prompt(options)
    cells = [("ours", s, b) for b in options.budgets for s in options.settings] + \
        [(str(p), None, b) for b in options.budgets for p in options.peers]
    results = []
    with tqdm(total=len(cells) * options.runs, unit="run", desc="profile",
              disable=not progress) as bar:
        for system, setting, budget_text in cells:
            budget = budget_bytes(budget_text, model_bytes)
            limit = None if budget is None else budget + baseline
            if system == "ours":
                spec = {"kind": "speed", "model": str(options.model_for(setting)),
                        "budget": budget, "load": options.load_arguments(setting), **prompt}
                cold = [options.model]
            else:
                spec = {"kind": "peer", "model": system, **prompt}
                cold = [Path(system)]
            runs = []
            for _ in range(options.runs):
                result = _child(spec, limit, enforcement, cold, options.timeout)
                runs.append(result)
                bar.update(1)
                if result["status"] == "refused":  # the planner's answer does not change
                    bar.update(options.runs - len(runs))
                    break
            results.append({"system": "ours" if system == "ours" else "llama.cpp",
                            "model": str(options.model) if system == "ours" else system,
                            "setting": setting, "budget": budget_text, "budget_bytes": budget,
                            "limit": limit, **_median(runs)})
    quality = _quality(options, results, text, reference, progress)
    if storage is not None:
        for cell in results:
            if cell["system"] == "ours" and cell["status"] == "ok" and cell.get("plan"):
                cell["predicted"] = _predict(options, cell["plan"], cell["config"], storage,
                                             prompt)
    return {"schema": SCHEMA, "model": str(options.model), "model_bytes": model_bytes,
            "baseline": baseline,
            "enforcement": {"kind": enforcement.kind, "enforced": enforcement.enforced,
                            "reason": enforcement.reason},
            "options": {"budgets": options.budgets, "settings": options.settings,
                        "peers": [str(p) for p in options.peers], "n": options.n,
                        "prompt_tokens": options.prompt_tokens, "runs": options.runs,
                        "threads": options.threads, "ctx": options.ctx,
                        "quality_text": str(text), "quality_tokens": options.quality_tokens},
            "cells": results, "quality": quality}


def _compute_seconds(options: SweepOptions, config: dict, prompt: dict) -> float:
    """Compute seconds per token of `config` (cell.compute), cached in the output folder."""
    cache_file = options.out / "compute-cache.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    key = json.dumps([config, options.threads, options.n], sort_keys=True)
    if key not in cache:
        spec = {"kind": "compute", "config": config, **prompt}
        result = _unlimited(spec, options.timeout)
        if result["status"] != "ok":
            raise FlashInferError(f"compute rate of {config} could not be measured: "
                                  f"{result.get('message')}")
        cache[key] = result["compute_s"]
        cache_file.write_text(json.dumps(cache, indent=1))
    return cache[key]


def _predict(options: SweepOptions, plan: dict, config: dict, storage: dict,
             prompt: dict) -> dict:
    from ..store.reader import open_store

    rows = open_store(Path(config["store"])).config.vocab_size
    return probe.predict(plan, _compute_seconds(options, config, prompt), storage,
                         plan["head_resident_rows"] / rows)


def plan_only(options: SweepOptions, storage: dict, progress: bool = True) -> dict:
    """Every (setting, budget) cell's plan (each in a fresh child, as the cell would plan it)
    and predicted speed, running nothing but the compute calibration (cached)."""
    options.out.mkdir(parents=True, exist_ok=True)
    model_bytes = _model_bytes(options.model)
    _, prompt = _prompt(options)
    cells = []
    for budget_text in options.budgets:
        budget = budget_bytes(budget_text, model_bytes)
        for setting in tqdm(options.settings, desc=f"plan {budget_text}", disable=not progress):
            cell = {"system": "ours", "setting": setting, "budget": budget_text,
                    "budget_bytes": budget}
            spec = {"kind": "plan", "model": str(options.model_for(setting)),
                    "budget": budget, "load": options.load_arguments(setting),
                    "ctx": options.ctx}
            result = _unlimited(spec, options.timeout)
            cell.update(result)
            if result["status"] == "planned":
                cell["predicted"] = _predict(options, result["plan"], result["config"],
                                             storage, prompt)
            cells.append(cell)
    return {"schema": SCHEMA + "+plan-only", "model": str(options.model), "cells": cells,
            "probe": storage}


def _quality(options: SweepOptions, results: list[dict], text: Path, reference: Path,
             progress: bool) -> dict:
    """Quality of every configuration a cell ran with (and of each peer GGUF), measured once
    and cached in the output folder; each cell gets its `quality_key`."""
    cache_file = options.out / "quality-cache.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    base = {"kind": "quality", "text_file": str(text), "tokens": options.quality_tokens,
            "ctx": options.ctx, "threads": options.threads, "reference": str(reference)}
    wanted: dict[str, dict] = {}
    for cell in results:
        if cell["status"] != "ok":
            continue
        config = cell["config"] if cell["system"] == "ours" else {"gguf": cell["model"]}
        key = _config_key(config, text, options.quality_tokens, options.ctx)
        cell["quality_key"] = key
        wanted[key] = config
    todo = [k for k in wanted if k not in cache]
    for key in tqdm(todo, unit="setting", desc="quality", disable=not progress):
        config = wanted[key]
        spec = {**base, **({"gguf": config["gguf"]} if "gguf" in config else
                           {"config": config})}
        result = _unlimited(spec, None)
        if result["status"] == "ok":
            cache[key] = {"config": config, **{k: result[k] for k in
                                               ("tokens", "perplexity", "top1_agreement",
                                                "mean_kl")}}
            cache_file.write_text(json.dumps(cache, indent=1))
        else:
            raise FlashInferError(f"quality of {config} could not be measured: "
                                  f"{result.get('message')}")
    return {k: cache[k] for k in wanted}
