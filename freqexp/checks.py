"""The generic checks of a config value, shared by every config reader (models, data, filters,
augmentations, validation, sweeps): each returns the value it accepts, or raises a one-line
ConfigError naming the key. Ground floor: imports nothing from freqexp but its errors."""
from __future__ import annotations

import difflib
from typing import Any, Iterable

from freqexp.errors import ConfigError


def is_int(value: Any) -> bool:
    """An integer, and not a bool (YAML's true is an int to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or a float, and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer(key: str, value: Any, low: int) -> int:
    """An integer >= low."""
    if not is_int(value) or value < low:
        raise ConfigError(key, f"must be an integer >= {low}; got {value!r}")
    return value


def positive_int(key: str, value: Any) -> int:
    if not is_int(value) or value < 1:
        raise ConfigError(key, f"must be a positive integer; got {value!r}")
    return value


def positive_int_list(key: str, value: Any) -> list[int]:
    values = list(value) if not isinstance(value, (str, int)) else None
    if not values:
        raise ConfigError(key, f"must be a non-empty list of positive integers, e.g. [32,64]; got {value!r}")
    return [positive_int(key, v) for v in values]


def non_negative_int(key: str, value: Any) -> int:
    return integer(key, value, 0)


def non_negative_number(key: str, value: Any) -> float:
    if not is_number(value) or value < 0:
        raise ConfigError(key, f"must be a number >= 0; got {value!r}")
    return float(value)


def number(key: str, value: Any, low: float, high: float | None = None, low_open: bool = False) -> float:
    """A float option checked against [low, high] (or (low, high] with low_open)."""
    ok = is_number(value) and (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        rng = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        raise ConfigError(key, f"must be a number {rng}; got {value!r}")
    return float(value)


def boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false; got {value!r}")
    return value


def choice(key: str, value: Any, allowed, sep: str = ", ") -> Any:
    """One of `allowed`; the message lists them joined by `sep`."""
    if value not in allowed:
        raise ConfigError(key, f"must be one of {sep.join(map(str, allowed))}; got {value!r}")
    return value


def did_you_mean(word: str, candidates: Iterable[str], n: int = 3) -> str:
    candidates = list(candidates)
    lower = {c.lower(): c for c in candidates}
    close = [lower[c] for c in difflib.get_close_matches(word.lower(), list(lower), n=n, cutoff=0.5)]
    if not close:  # also match on the last component (epochs -> trainer.max_epochs)
        tail = word.rsplit(".", 1)[-1]
        close = [c for c in candidates if tail and tail in c.rsplit(".", 1)[-1]][:n]
    return f"; did you mean {' or '.join(close)}?" if close else ""
