"""What a run records about itself: its params (the flattened config) and its provenance tags."""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline.config import AXES
from pipeline.config.stores import masked

COMMAND = "python -m pipeline"  # how the README and every recorded command spell ours


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"model": {"depth": 4}}`` -> ``{"model.depth": 4}``; empty/None groups are dropped."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif value is not None:
            flat[name] = value
    return flat


def trial_params(config: dict) -> dict[str, str]:
    """The five axes (group axes by name) plus the flattened config, as MLflow params."""
    trial_part = {k: v for k, v in config.items() if k not in ("study", "cluster", "space")}
    params = {k: masked(str(v)) for k, v in flatten(trial_part).items()}
    for axis in AXES:
        value = config[axis]
        params[axis] = str(value["name"] if isinstance(value, dict) else value)
    return params


@functools.lru_cache(maxsize=1)
def provenance() -> dict[str, str]:
    """Tags that say what produced a run: code version, packages, host."""
    tags = {"git_commit": _git_commit(), "python": platform.python_version(), "host": socket.gethostname()}
    for package in ("torch", "mlflow", "optuna", "ray", "hydra-core"):
        try:
            tags[f"version.{package}"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return tags


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def command_line() -> str:
    """This process's command, as a user would type it again (any URL's password masked)."""
    return masked(" ".join([COMMAND, *sys.argv[1:]]))


def reproduce_command(run_id: str) -> str:
    return f"{COMMAND} reproduce {run_id}"
