"""A study's Optuna storage: where it lives by default, and how a storage spec is opened.

A spec is an RDB URL (``sqlite:///...``, ``postgresql://...``) or the path of a ``*.journal`` file
(the default: ``<study.output_dir>/<study.name>/optuna.journal``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pipeline.record.uris import sqlite_path

JOURNAL_NAME = "optuna.journal"


def default_storage(output_dir: str, study_name: str) -> str:
    """``<output_dir>/<name>/optuna.journal``: an Optuna journal file, whose ask, suggest and tell
    cost about a seventh of a sqlite database's (docs/performance.md). A study begun with an
    ``optuna.db`` there (a sqlite storage) keeps it."""
    folder = Path(output_dir, study_name).resolve()
    if (folder / "optuna.db").exists():
        return f"sqlite:///{folder / 'optuna.db'}"
    return str(folder / JOURNAL_NAME)


def storage_file(spec: str) -> Optional[Path]:
    """The local file a storage spec names (a sqlite URL or a journal path); None for a server."""
    path = sqlite_path(spec)
    if path is not None:
        return path
    return Path(spec) if spec.endswith(".journal") else None


def open_storage(spec: str):
    """What Optuna's ``create_study``/``load_study`` take for ``study.storage``: a ``*.journal``
    path becomes a journal storage on that file (lock-protected: the pruning oracle's process
    writes to it too), anything else is an RDB URL."""
    if not spec.endswith(".journal"):
        return spec
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(spec))
