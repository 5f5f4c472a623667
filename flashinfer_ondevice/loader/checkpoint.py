"""Checkpoint: what every loader returns (config, float32 weights, tokenizer, chat template)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import ModelConfig
from ..weights import Weights
from .tokenizer import Tokenizer


@dataclass
class Checkpoint:
    config: ModelConfig
    weights: Weights
    tokenizer: Tokenizer
    chat_template: str | None  # Jinja template from the model, or None
    source: Path
    ggml_numerics: bool = False  # compute as llama.cpp's CPU backend rounds (GGUF sources)
