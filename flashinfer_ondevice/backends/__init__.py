"""Backends: where the forward pass's arithmetic runs (see backends/base.py for the interface).

`numpy` is the reference and always there; `cpu` is the fast path; `mlx` runs on Apple
silicon and NVIDIA GPUs where MLX is installed. `make_backend(None)` picks the default: the
fast path for this machine.
"""

from __future__ import annotations

from ..errors import FlashInferError
from .base import Backend
from .cpu import CpuBackend
from .mlx_backend import MlxBackend
from .numpy_backend import NumpyBackend

BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (NumpyBackend, CpuBackend, MlxBackend)}
DEFAULT = "cpu"


def installed_backends() -> list[str]:
    """The backends whose dependencies can be imported here."""
    return [name for name, b in BACKENDS.items() if b.installed()]


def make_backend(name: str | None = None, threads: int | None = None) -> Backend:
    """The backend called `name` (None: the default), or a FlashInferError naming the choices."""
    name = name or DEFAULT
    if name not in BACKENDS:
        raise FlashInferError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})")
    if not BACKENDS[name].installed():
        raise FlashInferError(f"backend {name!r} is not installed here (installed: "
                              f"{', '.join(installed_backends())}); "
                              f"{BACKENDS[name].install_hint}")
    return BACKENDS[name](threads)
