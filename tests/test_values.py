"""values.py: the checked reads every untrusted number and name goes through."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flashinfer_ondevice.errors import ArgumentError, ModelFileError
from flashinfer_ondevice.values import describe, flag, integer, number, printable, text


@pytest.mark.parametrize("value", [True, 1.0, "1", None, [1], np.float32(1)])
def test_integer_refuses_what_is_not_an_integer(value):
    with pytest.raises(ModelFileError, match="must be an integer"):
        integer(value, "n_layers")


def test_integer_ranges_and_numpy_integers():
    assert integer(np.int64(7), "x") == 7 and type(integer(np.uint32(7), "x")) is int
    with pytest.raises(ArgumentError, match=r"x=0 is out of range \(1\.\.16777216\)"):
        integer(0, "x", error=ArgumentError)
    with pytest.raises(ModelFileError, match="out of range"):
        integer(1 << 63, "x")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 0.0, -1e-9, 2.0])
def test_number_refuses_non_finite_and_out_of_range(value):
    with pytest.raises(ModelFileError, match="eps"):
        number(value, "eps", 0.0, 1.0)


def test_number_bounds():
    assert number(1, "x", 0.0, 1.0) == 1.0  # the top is included
    assert number(0, "x", 0.0, 1.0, low_open=False) == 0.0
    with pytest.raises(ModelFileError, match="must be a number"):
        number(True, "x", 0.0, 1.0)
    with pytest.raises(ModelFileError, match="must be a number"):
        number("0.5", "x", 0.0, 1.0)


def test_text_and_flag():
    assert text("gemma3", "arch") == "gemma3" and flag(False, "tie") is False
    with pytest.raises(ModelFileError, match="must be a string"):
        text(3, "arch")
    with pytest.raises(ModelFileError, match="must be true or false"):
        flag(1, "tie")


def test_printable_escapes_terminal_control():
    shown = printable("\x1b[31mred\x07\nx")
    assert "\x1b" not in shown and "\x07" not in shown and "\n" not in shown
    assert shown == "\\x1b[31mred\\x07\\nx"
    long = describe("a" * 1000)
    assert len(long) < 60 and long.endswith("(str)")
