"""Checks of dataset parameters (``data.*`` config keys), with messages that name the key."""

from __future__ import annotations

import numbers
from collections.abc import Iterable

from hetfl.errors import ConfigError

__all__ = ["check_choice", "check_fraction", "check_int", "split_counts"]


def check_fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) < 1.0:
        raise ConfigError(f"data.{name} must be in (0, 1), got {value!r}")
    return float(value)


def check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"data.{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_choice(name: str, value: str, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"data.{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def split_counts(n: int, test_fraction: float) -> int:
    """How many of ``n`` samples go to test: rounded, but leaving at least one on each side."""
    if n < 2:
        return 0
    return int(min(max(round(n * test_fraction), 1), n - 1))

