"""Value checks of evaluation options, raising :class:`~fastjac.training.config.ConfigError` that name
``evaluations.<name>.<option>`` (types are already checked by the registry's ``from_dict``).

Used from the options dataclasses' ``__post_init__``, so a bad value fails when the config is loaded.
"""
from __future__ import annotations

from typing import Any, Iterable

from ..training.config import ConfigError


def option_error(evaluation: str, option: str, message: str) -> ConfigError:
    """A :class:`ConfigError` naming ``evaluations.<evaluation>.<option>``."""
    return ConfigError(f"evaluations.{evaluation}.{option}: {message}")


def _fail(evaluation: str, option: str, expected: str, value: Any) -> None:
    raise option_error(evaluation, option, f"expected {expected}, got {value!r}")


def positive(evaluation: str, option: str, value: Any) -> None:
    """``value > 0`` (int or float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        _fail(evaluation, option, "a positive number", value)


def positive_int(evaluation: str, option: str, value: Any, allow_none: bool = False) -> None:
    """An integer ``>= 1`` (or None when ``allow_none``)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(evaluation, option, f"a positive integer{' or null' if allow_none else ''}", value)


def non_negative(evaluation: str, option: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        _fail(evaluation, option, "a number >= 0", value)


def fraction(evaluation: str, option: str, value: Any, low_open: bool = False, high_open: bool = False) -> None:
    """``value`` in [0, 1] (``low_open`` / ``high_open``: excluding that end)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
        (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not ok:
        _fail(evaluation, option, f"a fraction in {'(' if low_open else '['}0, 1{')' if high_open else ']'}", value)


def choice(evaluation: str, option: str, value: Any, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        _fail(evaluation, option, f"one of {list(allowed)}", value)


def positive_list(evaluation: str, option: str, values: Any, integer: bool = False) -> None:
    """A non-empty list of positive numbers (integers if ``integer``)."""
    kinds = (int,) if integer else (int, float)
    if not isinstance(values, list) or not values or any(
            isinstance(v, bool) or not isinstance(v, kinds) or not v > 0 for v in values):
        _fail(evaluation, option, f"a non-empty list of positive {'integers' if integer else 'numbers'}", values)


def non_negative_int_list(evaluation: str, option: str, values: Any) -> None:
    """A list (possibly empty) of integers >= 0 without repeats."""
    if not isinstance(values, list) or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values) \
            or len(set(values)) != len(values):
        _fail(evaluation, option, "a list of distinct integers >= 0", values)


def string_list(evaluation: str, option: str, values: Any) -> None:
    if not isinstance(values, list) or any(not isinstance(v, str) for v in values):
        _fail(evaluation, option, "a list of strings", values)
