"""Loaders: turn a model file or folder into a `Checkpoint` (config, float weights, tokenizer).

`load_checkpoint(path)` picks the loader: a `.gguf` file, or a Hugging Face folder holding
config.json, *.safetensors and tokenizer.json. Every loader validates what it reads against
the file (sizes, offsets, names, shapes) before allocating, and reports problems as
`ModelFileError` / `UnsupportedModelError` with a one-line message.
"""

from __future__ import annotations

from pathlib import Path

from ..config import ModelConfig
from ..errors import ModelFileError
from .checkpoint import Checkpoint


def load_checkpoint(path: str | Path, progress: bool = False, lazy: bool = False) -> Checkpoint:
    """`lazy`: a GGUF's blocks are dequantized only when read (see load_gguf)."""
    path = _existing(path)
    if path.is_dir():
        from .hf import load_hf_folder
        return load_hf_folder(path, progress=progress)
    from .gguf_file import load_gguf
    return load_gguf(path, progress=progress, lazy=lazy)


def check_source(path: str | Path) -> None:
    """Validate a GGUF file or Hugging Face folder without reading its weights (headers,
    config, tensor records, vocabulary): what conversion would refuse, refused at once."""
    path = _existing(path)
    if path.is_dir():
        from .hf import check_hf_folder
        check_hf_folder(path)
    else:
        from .gguf_file import check_gguf
        check_gguf(path)


def source_config(path: str | Path) -> ModelConfig:
    """The model config of a GGUF file or Hugging Face folder, reading no weight."""
    path = _existing(path)
    if path.is_dir():
        from .hf import hf_config
        return hf_config(path)
    from .gguf_file import read_config
    from .gguf_header import read_header
    return read_config(read_header(path))


def _existing(path: str | Path) -> Path:
    """`path` as a Path naming a folder or a regular file (a FIFO or a device would block
    or never end)."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model not found: {path}")
    if not path.is_dir() and not path.is_file():
        raise ModelFileError(f"{path} is neither a model file nor a folder")
    return path
