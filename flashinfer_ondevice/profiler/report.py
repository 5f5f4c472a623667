"""The profile's outputs: a terminal table, Markdown, and JSON with a checked schema.

JSON (SCHEMA "flashinfer-ondevice-profile/1"): {schema, model, model_bytes, baseline,
enforcement {kind, enforced, reason}, options {...}, cells [...], quality {key: {...}}}. A cell:
system ("ours" | "llama.cpp"), model, setting (ours; null for a peer), budget (as asked),
budget_bytes and limit (null: none), status ("ok" | "refused" | "oom" | "timeout" | "error"),
message (not ok), smallest (refused: the smallest budget that works); when ok: decode_tps
(median), decode_tps_runs, prompt_tps, ttft_s, bytes_per_token, peak_rss, cgroup_peak
(null where not enforced), watched_peak, quality_key; ours also io_wait_ms, cache_ms,
compute_ms (per token), kv_spill_per_token, plan {resident_bytes, streamed_bytes, kv_bytes,
kv_resident_tokens, smallest_budget, shortlist, prefill_batch} and config (what quality was
measured for). quality[key]: tokens, perplexity, top1_agreement and mean_kl (null for peers).
"""

from __future__ import annotations

from .sweep import SCHEMA

STATUSES = ("ok", "refused", "oom", "timeout", "error")
_CELL_KEYS = {"system": str, "model": str, "budget": str, "status": str}
_OK_KEYS = {"decode_tps": float, "decode_tps_runs": list, "prompt_tps": float, "ttft_s": float,
            "bytes_per_token": float, "peak_rss": int, "quality_key": str}
_QUALITY_KEYS = {"tokens": int, "perplexity": float}


def validate(result: dict) -> None:
    """Raise ValueError where `result` does not follow the schema above."""
    def need(record: dict, keys: dict, where: str) -> None:
        for key, kind in keys.items():
            value = record.get(key)
            if kind is float and isinstance(value, int):
                continue
            if not isinstance(value, kind):
                raise ValueError(f"{where}: '{key}' should be {kind.__name__}, got {value!r}")

    if result.get("schema") != SCHEMA:
        raise ValueError(f"schema is {result.get('schema')!r}, expected {SCHEMA!r}")
    need(result, {"model": str, "baseline": int, "enforcement": dict, "options": dict,
                  "cells": list, "quality": dict}, "result")
    for i, cell in enumerate(result["cells"]):
        need(cell, _CELL_KEYS, f"cell {i}")
        if cell["status"] not in STATUSES:
            raise ValueError(f"cell {i}: unknown status {cell['status']!r}")
        if cell["status"] == "ok":
            need(cell, _OK_KEYS, f"cell {i}")
            if cell["quality_key"] not in result["quality"]:
                raise ValueError(f"cell {i}: no quality for {cell['quality_key']}")
        elif cell["status"] == "refused":
            need(cell, {"smallest": int}, f"cell {i}")
    for key, record in result["quality"].items():
        need(record, _QUALITY_KEYS, f"quality {key}")


def _mb(value: float | None) -> str:
    return "" if value is None else f"{value / 1e6:.1f}"


def rows(result: dict) -> list[list[str]]:
    """One row per cell: what the table shows."""
    out = []
    for cell in result["cells"]:
        name = cell["system"] if cell["system"] == "ours" else \
            f"llama.cpp {cell['model'].rsplit('/', 1)[-1]}"
        head = [name, cell["setting"] or "", cell["budget"], _mb(cell["limit"]) or "none"]
        status = cell["status"]
        if status == "refused":
            out.append(head + [f"refused: needs >= {_mb(cell['smallest'])} MB"] + [""] * 10)
            continue
        if status != "ok":
            peak = cell.get("cgroup_peak") or cell.get("watched_peak")
            detail = f"OOM (limit {_mb(cell['limit'])} MB, peak {_mb(peak)} MB)" \
                if status == "oom" else f"{status}: {cell.get('message', '')[:60]}"
            out.append(head + [detail] + [""] * 10)
            continue
        runs = cell["decode_tps_runs"]
        spread = f" ({min(runs):.1f}-{max(runs):.1f})" if len(runs) > 1 else ""
        split = "" if "io_wait_ms" not in cell else \
            f"{cell['io_wait_ms']:.1f} / {cell['cache_ms']:.1f} / {cell['compute_ms']:.1f}"
        quality = result["quality"][cell["quality_key"]]
        peak = _mb(cell["peak_rss"]) + (f" / {_mb(cell['cgroup_peak'])}"
                                         if cell.get("cgroup_peak") else "")
        predicted = cell.get("predicted")
        out.append(head + [
            f"{cell['decode_tps']:.1f}{spread}",
            "" if not predicted else f"{predicted['decode_tps']:.1f}",
            f"{cell['prompt_tps']:.0f}",
            f"{cell['ttft_s']:.2f}", _mb(cell["bytes_per_token"]), split, peak,
            f"{quality['perplexity']:.3f}",
            "" if quality["top1_agreement"] is None else f"{quality['top1_agreement']:.1%}",
            "" if quality["mean_kl"] is None else f"{quality['mean_kl']:.4f}",
            "" if not cell.get("plan") else
            f"{_mb(cell['plan']['resident_bytes'])} / {_mb(cell['plan']['streamed_bytes'])}"])
    return out


HEADERS = ["system", "setting", "budget", "limit MB", "decode tok/s", "predicted",
           "prompt tok/s",
           "TTFT s", "MB read/token", "I/O / cache / compute ms", "peak RSS / cgroup MB",
           "perplexity", "top-1", "KL", "resident / streamed MB"]


def _enforcement_line(result: dict) -> str:
    e = result["enforcement"]
    return (f"memory limit: {e['kind']} ({e['reason']})" if e["enforced"] else
            f"memory limit: not enforced, peak measured ({e['reason']})")


def markdown(result: dict) -> str:
    o = result["options"]
    lines = [f"# Memory-budget profile of {result['model']}", "",
             f"{o['runs']} run(s) per cell, {o['prompt_tokens']}-token prompt, {o['n']} greedy "
             f"tokens, {o['threads']} threads; limit = budget + baseline "
             f"{_mb(result['baseline'])} MB; quality on {o['quality_tokens']} tokens of "
             f"{o['quality_text'].rsplit('/', 1)[-1]} against the exact model.",
             _enforcement_line(result), "",
             "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows(result)]
    return "\n".join(lines) + "\n"


def terminal(result: dict) -> str:
    table = [HEADERS, *rows(result)]
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADERS))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
             for r in table]
    return "\n".join([_enforcement_line(result), *lines])


PLAN_HEADERS = ["setting", "budget", "store", "head", "resident MB", "streamed MB/token",
                "predicted tok/s", "I/O / compute ms"]


def plan_table(result: dict) -> str:
    """`profile --plan-only`: each cell's plan and predicted speed."""
    table = [PLAN_HEADERS]
    for cell in result["cells"]:
        head = [cell["setting"], cell["budget"]]
        if cell["status"] == "refused":
            table.append(head + [f"refused: needs >= {_mb(cell['smallest'])} MB"] + [""] * 5)
            continue
        if cell["status"] != "planned":
            table.append(head + [f"{cell['status']}: {cell.get('message', '')[:70]}"]
                         + [""] * 5)
            continue
        plan, predicted = cell["plan"], cell["predicted"]
        table.append(head + [cell["config"]["store"].rsplit("/", 1)[-1],
                             cell["config"]["head"], _mb(plan["resident_bytes"]),
                             _mb(predicted["bytes_per_token"]),
                             f"{predicted['decode_tps']:.1f}",
                             f"{predicted['io_ms']:.1f} / {predicted['compute_ms']:.1f}"])
    widths = [max(len(r[i]) for r in table) for i in range(len(PLAN_HEADERS))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
                     for r in table)
