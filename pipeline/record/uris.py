"""Tracking URIs: the one place that parses them.

A sqlite store (``sqlite:///relative/or/absolute.db``) is a file one host writes; anything else
(``http(s)://``, ``databricks``...) is a server that every node reaches.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from pipeline.config import ConfigError
from pipeline.config.stores import SQLITE, sqlite_path


def local_store(uri: str) -> Optional[Path]:
    """The absolute file of a sqlite tracking store (None for a server): only its own host can write to it."""
    path = sqlite_path(uri)
    return path.resolve() if path is not None else None


def resolve_uri(uri: str) -> str:
    """Make a relative sqlite path absolute (and its directory exist), so workers agree on it."""
    path = local_store(uri)
    if path is None:
        return uri
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"{SQLITE}{path}"


def for_workers(tracking_section: dict) -> dict:
    """A config's ``tracking`` section as it travels to workers: the driver's absolute store path,
    not one each worker would resolve against its own working directory."""
    return {**tracking_section, "uri": resolve_uri(tracking_section["uri"])}


def is_server(uri: str) -> bool:
    """Whether ``uri`` names a tracking server (artifacts are then the server's to place)."""
    return uri.startswith(("http://", "https://", "databricks"))


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail at once, with a clear message, if an HTTP tracking server does not answer."""
    if urlparse(uri).scheme not in ("http", "https"):
        return
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).read()
    except Exception as err:
        raise ConfigError(
            f"tracking.uri={uri} is unreachable within {timeout_s:g} s ({err}); start it with scripts/mlflow_server.sh"
        ) from err


def check_writable(tracking_uri: str, artifact_root: str) -> None:
    """A local store's folder and its artifact root can be written, checked before any work starts
    (a trial would otherwise train and then fail to save its artifacts)."""
    store = local_store(tracking_uri)
    places = [("tracking.uri", tracking_uri, store.parent)] if store is not None else []
    if not is_server(tracking_uri):
        places.append(("tracking.artifact_root", artifact_root, Path(artifact_root).resolve()))
    for key, value, folder in places:
        _check_folder(key, value, folder)


def _check_folder(key: str, value: str, folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        ok = os.access(folder, os.W_OK | os.X_OK)
    except OSError as err:
        raise ConfigError(f"{key}={value} cannot be used: {err.strerror or err} ({folder})") from err
    if not ok:
        raise ConfigError(f"{key}={value} cannot be used: {folder} is not writable")


def check_store_exists(uri: str) -> None:
    """Reading a store must not create an empty one (MLflow creates a missing sqlite file silently)."""
    path = local_store(uri)
    if path is not None and not path.exists():
        raise ConfigError(f"no MLflow store at {path} (tracking.uri={uri}); run a study first or pass tracking.uri=...")
