"""The one exception type for bad user input.

Anything raised as ``ConfigError`` is the user's to fix: the CLI prints its message on one line and
exits with code 2, before any training starts and before any MLflow run is opened.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the value and the valid ones."""
