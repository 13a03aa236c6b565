"""Checks on plain settings, with messages that name the setting."""

from __future__ import annotations

from typing import Any

from sharebone.errors import SettingError


def check_count(name: str, value: Any, low: int = 1) -> int:
    """``value`` as an int, refusing anything that is not a whole number ``>= low``.

    Example:
        >>> check_count("k_shot", 5)
        5
        >>> check_count("n_way", "abc")
        Traceback (most recent call last):
        ...
        sharebone.errors.SettingError: n_way must be an integer >= 1, got 'abc'.
    """
    whole = isinstance(value, int) and not isinstance(value, bool)
    if not (whole or (isinstance(value, float) and value.is_integer())) or value < low:
        raise SettingError(f"{name} must be an integer >= {low}, got {value!r}.")
    return int(value)
