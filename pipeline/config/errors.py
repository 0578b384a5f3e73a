"""The one exception type for bad user input, and the one way an error becomes a line of text.

Anything raised as ``ConfigError`` is the user's to fix: the CLI prints its message on one line and
exits with code 2, before any training starts and before any MLflow run is opened.
"""

from __future__ import annotations

from typing import Optional


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the value and the valid ones."""


def one_line(err: object, limit: Optional[int] = None, with_cause: bool = False) -> str:
    """``err``'s text with every run of whitespace (newlines included) made one space.

    Args:
        err: an exception or any object with a useful ``str``.
        limit: keep at most this many characters.
        with_cause: append the exception's ``__cause__`` in parentheses where it adds something
            (Hydra wraps the error that says what is wrong).
    """
    text = " ".join(str(err).split())
    cause = getattr(err, "__cause__", None)
    if with_cause and cause is not None and str(cause) and str(cause) not in text:
        text += f" ({one_line(cause)})"
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text
