"""Where a tracking URI keeps its files: the one parser of sqlite URIs (pipeline/record/uris.py
builds on it), the default artifact root that follows the store, and the one masker of the
passwords a store's URL may carry (nothing recorded or printed keeps them)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

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


#: ``scheme://user:password@host``: the password part of a URL, wherever it sits in a text.
_URL_PASSWORD = re.compile(r"(://[^:/@\s]+):[^@\s]*@")
MASK = "***"


def masked(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``."""
    return _URL_PASSWORD.sub(rf"\1:{MASK}@", text)


def masked_tree(tree: Any) -> Any:
    """A config tree (dicts, lists, values) with ``masked`` applied to every string in it."""
    if isinstance(tree, dict):
        return {key: masked_tree(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [masked_tree(value) for value in tree]
    return masked(tree) if isinstance(tree, str) else tree


def without_password(url: str) -> str:
    """A masked URL made usable again: ``user:***@`` -> ``user@``, so the database client takes
    the password from its own sources (PostgreSQL's PGPASSFILE or PGPASSWORD)."""
    return url.replace(f":{MASK}@", "@")
