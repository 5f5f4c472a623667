"""The machine a benchmark ran on, saved with its results so that figures from different
machines are never mixed in one table.

describe_machine() is what each benchmark stores under its JSON's top-level "machine" key;
machine_summary() is the one-line caption printed above its tables; same_machine() decides
whether two results may share a table; save_results() writes a result's JSON and table. The
machines that run these benchmarks vary (AMD EPYC with AVX-512, Intel Xeon with AMX), and so
does the llama.cpp peer's build (native, or portable with fewer SIMD paths), so a machine is
identified by its CPU model, its SIMD flags and the llama.cpp build's own feature list
together.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

# The SIMD features that numba's kernels, numpy's BLAS and llama.cpp dispatch on, spelled as
# in /proc/cpuinfo (which writes "avx512vbmi" but "avx512_vnni").
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512dq",
              "avx512vl", "avx512_vnni", "avx512vbmi", "avx512_bf16", "avx512_fp16", "avx_vnni",
              "amx_tile", "amx_int8", "amx_bf16")


def _first_processor() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo; empty where there is no such file."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the blank line after the first processor
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def _llama_cpp(python: str | None = None) -> tuple[str | None, str | None]:
    """llama-cpp-python's version and its build's system info, or Nones where it does not load;
    `python`: of another environment (the peer's build), asked in a child process."""
    if python is not None:
        code = ("import llama_cpp; print(llama_cpp.__version__); "
                "print(llama_cpp.llama_print_system_info().decode().strip())")
        child = subprocess.run([python, "-c", code], capture_output=True, text=True,
                               timeout=120)
        if child.returncode != 0:
            return None, None
        version, info = child.stdout.strip().split("\n", 1)
        return version, info
    try:
        import llama_cpp
    except (ImportError, OSError, RuntimeError):  # not installed; its library does not load
        return None, None
    return llama_cpp.__version__, llama_cpp.llama_print_system_info().decode().strip()


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def describe_machine(llama_python: str | None = None) -> dict:
    """This machine's CPU, memory, software and llama.cpp build (that of `llama_python`'s
    environment when given: the peer's), as stored with results."""
    import psutil

    cpu = _first_processor()
    flags = set(cpu.get("flags", "").split())
    llama_version, llama_info = _llama_cpp(llama_python)
    return {
        "cpu_model": cpu.get("model name") or platform.processor() or platform.machine(),
        "vendor": cpu.get("vendor_id"),
        "simd_flags": [flag for flag in SIMD_FLAGS if flag in flags],
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "memory_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "numba": _version("numba"),
        "llama_cpp_python": llama_version,
        "llama_cpp_system_info": llama_info,
    }


def _llama_cpp_features(machine: dict) -> list[str] | None:
    """The features its system info lists as on ("AVX2 = 1"); None where it did not load."""
    info = machine["llama_cpp_system_info"]
    return None if info is None else re.findall(r"(\w+) = 1\b", info)


def _identity(machine: dict) -> tuple:
    return (machine["cpu_model"], frozenset(machine["simd_flags"]),
            _llama_cpp_features(machine))


def same_machine(a: dict | None, b: dict | None) -> bool:
    """Whether two descriptions are of one machine: the same CPU model, SIMD flags and
    llama.cpp build features. A machine not recorded (None, older results) matches none."""
    return a is not None and b is not None and _identity(a) == _identity(b)


def machine_summary(machine: dict | None) -> str:
    """One line for a table caption, e.g. "AMD EPYC, 2 of 2 CPUs, 8 GiB | sse4_2 avx avx2 ... |
    llama.cpp 0.3.16: SSE3 AVX AVX2 AVX512 ..." (the llama.cpp features that are on). It shows
    everything same_machine() compares, so two machines it tells apart read differently."""
    if machine is None:
        return "unknown machine (not recorded in the result)"
    flags = " ".join(machine["simd_flags"]) or "no SIMD flags known"
    features = _llama_cpp_features(machine)
    llama = ("llama.cpp not loaded" if features is None
             else f"llama.cpp {machine['llama_cpp_python']}: {' '.join(features)}")
    return (f"{machine['cpu_model']}, {machine['usable_cpus']} of {machine['logical_cpus']} "
            f"CPUs, {machine['memory_bytes'] / 2**30:.0f} GiB | {flags} | {llama}")


def save_results(result: dict, table: str, json_path: Path, md_path: Path) -> None:
    """Write a benchmark's result as JSON and its table as Markdown, and print the table."""
    for path, text in ((json_path, json.dumps(result, indent=2)), (md_path, table)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(table)
