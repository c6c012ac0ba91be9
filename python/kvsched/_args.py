"""Argument checks shared by the public constructors (Scheduler, TransferEngine).

Integers take anything with ``__index__`` (numpy integers) but never a bool or a float; durations
take real numbers (numpy floats included); both are range-checked, and every refusal names the
argument and its range (docs/semantics.md "Ranges")."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

from .errors import InvalidArgumentError

MAX_DURATION_S = 1e9  # about 31.7 years; far below int64 nanoseconds (292 years)


def check_int(name: str, value: Any, lo: int, hi: int) -> int:
    """An integer argument: an int or anything with ``__index__`` (numpy integers), not a bool."""
    if isinstance(value, bool) or isinstance(value, float) or not hasattr(type(value), "__index__"):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    try:
        v = operator.index(value)
    except Exception:  # noqa: BLE001 - a broken __index__ is the caller's wrong type
        raise TypeError(f"{name} must be an int ({type(value).__name__}.__index__ failed)") from None
    if not lo <= v <= hi:
        raise InvalidArgumentError(f"{name} must be in [{lo}, {hi}], got {short_repr(v)}")
    return v


def check_seconds(name: str, value: Any, lo: float) -> float:
    """A duration in seconds: a real number in [lo, MAX_DURATION_S] (numpy scalars accepted)."""
    if isinstance(value, bool) or not (
        isinstance(value, numbers.Real) or hasattr(type(value), "__index__")
    ):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    try:
        v = float(value if isinstance(value, numbers.Real) else operator.index(value))
    except OverflowError:
        v = math.inf
    except Exception:  # noqa: BLE001 - a broken __float__/__index__ is the caller's wrong type
        raise TypeError(f"{name} must be a number of seconds ({type(value).__name__} did not convert)") from None
    if math.isnan(v) or not lo <= v <= MAX_DURATION_S:
        raise InvalidArgumentError(
            f"{name} must be in [{lo:g}, {MAX_DURATION_S:g}] seconds, got {short_repr(value)}"
        )
    return v


def short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:40]}... ({len(text)} characters)"
