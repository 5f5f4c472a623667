"""Checked reads of untrusted values: integers, finite numbers and names, with their ranges.

Every number that enters from a file (GGUF metadata, config.json, a store's manifest) or from a
caller (API arguments) goes through one of these before it is used, so a wrong type, NaN, an
infinity or an absurd size becomes a one-line error naming the field, never a traceback or a
model that silently produces garbage. `printable` makes strings from files safe to print.
"""

from __future__ import annotations

import math
import numbers

from .errors import FlashInferError, ModelFileError

MAX_SIZE = 1 << 24  # largest dimension, layer count or context any supported model has
MAX_SEED = (1 << 64) - 1  # sampling seeds are unsigned 64-bit


def describe(value: object) -> str:
    """A short, printable description of an untrusted value for an error message."""
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{printable(text)} ({type(value).__name__})"


def printable(text: str, keep: str = "") -> str:
    """`text` with control characters (terminal escapes, newlines) shown as escapes, except
    those in `keep`."""
    return "".join(c if c.isprintable() or c in keep else repr(c)[1:-1] for c in text)


def integer(value: object, name: str, low: int = 1, high: int = MAX_SIZE,
            error: type[FlashInferError] = ModelFileError) -> int:
    """`value` as an int in [low, high]; booleans and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise error(f"{name} must be an integer, got {describe(value)}")
    if not low <= value <= high:
        raise error(f"{name}={value} is out of range ({low}..{high})")
    return int(value)


def number(value: object, name: str, low: float, high: float, low_open: bool = True,
           error: type[FlashInferError] = ModelFileError) -> float:
    """`value` as a finite float in (low, high] (or [low, high] if not `low_open`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise error(f"{name} must be a number, got {describe(value)}")
    value = float(value)
    below = value <= low if low_open else value < low
    if not math.isfinite(value) or below or value > high:
        bracket = "(" if low_open else "["
        raise error(f"{name}={value} is out of range ({bracket}{low:g}, {high:g}])")
    return value


def text(value: object, name: str, error: type[FlashInferError] = ModelFileError) -> str:
    if not isinstance(value, str):
        raise error(f"{name} must be a string, got {describe(value)}")
    return value


def flag(value: object, name: str, error: type[FlashInferError] = ModelFileError) -> bool:
    if not isinstance(value, bool):
        raise error(f"{name} must be true or false, got {describe(value)}")
    return value
