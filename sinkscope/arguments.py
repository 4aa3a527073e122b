"""Checks of the Python API's arguments, shared by `metrics`, `analysis`, `viz`, `eval` and the models: one
message form for a count or an index that is not a whole number in its range (numpy only, so that the recorder's
imports stay light)."""

from __future__ import annotations

import numpy as np


def _is_whole(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def whole_number(value, name: str, low: int = 1, high: int | None = None, what: str = "",
                 error: type[Exception] = ValueError) -> int:
    """`value` as an int in [low, high] (no upper bound for None), else `error` naming `name`, the range, `what`
    it counts and the value (a float or a bool is refused, not truncated)."""
    if _is_whole(value) and value >= low and (high is None or value <= high):
        return int(value)
    bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
    raise error(f"{name} must be a whole number {bound}{what}, not {value!r}")


def nonnegative(value, name: str, what: str = "", error: type[Exception] = ValueError) -> float:
    """`value` as a finite float >= 0 (a threshold), else `error`; NaN, infinities and bools are refused."""
    if not isinstance(value, bool) and isinstance(value, (int, float, np.number)) and np.isfinite(value) \
            and value >= 0:
        return float(value)
    raise error(f"{name} must be a finite number >= 0{what}, not {value!r}")


def index_into(value, size: int, name: str, of: str) -> int:
    """`value` as an index into `size` items (negative counts from the end, as in Python), else a ValueError
    naming `name`, the range and what the items are (`of`: "layers", "tokens", ...)."""
    if _is_whole(value) and -size <= value < size:
        return int(value) % size
    raise ValueError(f"{name} must be a whole number in [0, {size - 1}] ({size} {of}; negative counts from the end), "
                     f"not {value!r}")


def unit_interval(value, name: str) -> float:
    """`value` as a float in [0, 1] (a share: eps of alpha, a fraction of heads or layers), else a ValueError;
    NaN and bools are refused."""
    if not isinstance(value, bool) and isinstance(value, (int, float, np.number)) and 0 <= value <= 1:
        return float(value)
    raise ValueError(f"{name} must be a number in [0, 1], not {value!r}")
