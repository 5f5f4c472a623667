"""Imports flow one way: every import in the package (including those inside functions and
under TYPE_CHECKING) points down the layer list of the README's layout section, and no
module imports itself back through a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "flashinfer_ondevice"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# Lowest first; a module may import modules of its own layer or of a lower one. Keep in step
# with the README's "Layout" section.
LAYERS = [
    {"errors", "values", "stats", "memory", "functional", "detokenize"},  # foundations
    {"config"},  # hyperparameters, the one table of architecture differences
    {"schema", "quant", "kv_cache", "kv_spill"},  # tensor names and shapes; codecs; the KV
    # cache and its spill file
    {"backends"},  # where the arithmetic runs: numpy, cpu, mlx
    {"weights", "sampling"},  # what the forward pass reads, and sampling
    {"model"},  # the forward pass
    {"store"},  # the flash-store format: manifest, reader, direct I/O
    {"loader", "default_model"},  # source checkpoints (GGUF, HF folders) and tokenizers
    {"runtime"},  # planner, streamed/sparse weights, opening a store as a session
    {"generate", "chat", "evaluate"},  # token loop, chat templates, scoring
    {"build"},  # convert, calibration, output-layer proxy fit (may drive the runtime)
    {"api"},  # load() and Model
    {"profiler"},  # run-model profile: cells under memory limits, quality, reports
    {"cli"},  # run-model
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules that `name` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:  # `from . import kernels` names a submodule
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
    return {m for m in found if m == PACKAGE or m.startswith(PACKAGE + ".")}


def layer_of(module: str) -> int:
    top = module.split(".")[1]
    for index, layer in enumerate(LAYERS):
        if top in layer:
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and the README's layout")


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) - {name} for name, path in found.items()}


def test_every_import_points_down_the_layers():
    upward = []
    for source, targets in graph().items():
        if source == PACKAGE:
            continue  # the package's face re-exports the API
        for target in targets:
            if target == PACKAGE or layer_of(target) > layer_of(source):
                upward.append(f"{source} -> {target}")
    assert not upward, "imports pointing up the layers:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The walker itself: an import inside a function, relative to a subpackage, counts."""
    known = {f"{PACKAGE}.store.reader", f"{PACKAGE}.api", f"{PACKAGE}.store"}
    source = tmp_path / "reader.py"
    source.write_text("def f():\n    from ..api import load\n    from . import reader\n")
    assert imports(f"{PACKAGE}.store.reader", source, known) == {
        f"{PACKAGE}.api", f"{PACKAGE}.store.reader"}
    assert layer_of(f"{PACKAGE}.api") > layer_of(f"{PACKAGE}.store.reader")


def test_import_has_no_side_effects():
    """Importing the package loads no llama.cpp, runs no kernel and measures nothing: the
    baseline is taken when a model is first loaded."""
    import subprocess
    import sys

    code = ("import sys, flashinfer_ondevice as fi\n"
            "from flashinfer_ondevice.runtime.engine import process_baseline\n"
            "loaded = sorted(m for m in sys.modules if m.startswith('llama_cpp'))\n"
            "print(loaded, process_baseline.cache_info().currsize)")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=120)
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["[]", "0"]
