"""Where a tracking URI keeps its files: the one parser of sqlite URIs (pipeline/record/uris.py
builds on it), and the default artifact root that follows the store."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

SQLITE = "sqlite:///"
#: The artifact root of a store served over HTTP is the server's; this value is then unused.
SERVER_ARTIFACTS = "runs/artifacts"


def sqlite_path(uri: str) -> Optional[Path]:
    """The file a ``sqlite:///`` URI names, as written (relative paths stay relative); None otherwise."""
    return Path(uri[len(SQLITE) :]) if uri.startswith(SQLITE) else None


def artifacts_beside(uri: str) -> str:
    """``tracking.artifact_root`` by default: ``artifacts`` beside a sqlite store's file, so that
    ``tracking.uri=sqlite:///elsewhere/mlflow.db`` alone keeps the whole record in ``elsewhere/``."""
    path = sqlite_path(uri)
    return str(path.parent / "artifacts") if path is not None else SERVER_ARTIFACTS
