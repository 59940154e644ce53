"""Errors that reach the user as one line, without a traceback."""
from __future__ import annotations


class FreqexpError(Exception):
    """A problem the user can fix (config, data); printed as one line."""


class ConfigError(FreqexpError):
    """A config value is invalid. `key` is the dotted config key the user should change."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")


class DataError(FreqexpError):
    """Data is missing, corrupt or inconsistent."""


class TrainingError(FreqexpError):
    """Training went wrong in a way a setting explains (NaN loss, ...)."""


class ReportError(ValueError):
    """Bad input for an option of a command that reads a store (report, figures, orphans); the
    message names the option."""


def one_line(e: BaseException) -> str:
    """An exception's message on one line (whitespace collapsed), or its type's name when it has none."""
    return " ".join(str(e).split()) or type(e).__name__
