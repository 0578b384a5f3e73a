"""A study's Optuna storage: where it lives by default, and how a storage spec is opened.

A spec is an RDB URL (``sqlite:///...``, ``postgresql://...``) or the path of a ``*.journal`` file
(the default: ``<study.output_dir>/<study.name>/optuna.journal``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

from pipeline.config import ConfigError, one_line, stores
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
    writes to it too); a database server's URL an RDB storage that gives up connecting after
    ``CONNECT_TIMEOUT_S``; a sqlite URL goes to Optuna as it is."""
    if spec.endswith(".journal"):
        from pipeline.study.optuna_journal import open_journal

        Path(spec).parent.mkdir(parents=True, exist_ok=True)  # Optuna makes the file, not its folder
        return open_journal(spec)
    if spec.startswith(DATABASE_SERVERS):
        return _database_server(spec)
    return spec


def check_storage(spec: str) -> None:
    """A database server that is missing its driver or does not answer fails now, before Ray starts."""
    if spec.startswith(DATABASE_SERVERS):
        _database_server(spec)


CONNECT_TIMEOUT_S = 5
DATABASE_SERVERS = ("postgresql", "mysql")
DRIVERS = "psycopg2-binary for PostgreSQL, pymysql for MySQL"


def _database_server(spec: str):
    from optuna.storages import RDBStorage

    try:
        return RDBStorage(spec, engine_kwargs={"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}})
    except ImportError as err:
        raise ConfigError(
            f"study.storage={masked(spec)} needs its database driver ({DRIVERS}): {one_line(err, 200)}"
        ) from err
    except Exception as err:  # SQLAlchemy's OperationalError: refused, timed out, bad credentials
        # The driver's own error (err.orig) says why; SQLAlchemy's wrapper adds a link to its docs.
        why = getattr(err, "orig", None) or err
        raise ConfigError(
            f"study.storage={masked(spec)} cannot be opened within {CONNECT_TIMEOUT_S} s ({one_line(why, 300)})"
        ) from err


def masked(spec: str) -> str:
    """A storage URL with its password replaced by ***, for messages."""
    return stores.masked(spec)


def repair_torn_tail(spec: str) -> int:
    """Drop a journal's last record if a write was cut short (a power loss, a full disk): Optuna
    writes each record as one line, so a last line without its newline is a partial record, and
    the next record appended to it would make the journal unreadable. Only a study's driver, which
    holds the study's lock (pipeline/study/lock.py), may call this. Returns the bytes dropped."""
    path = storage_file(spec)
    if path is None or sqlite_path(spec) is not None or not path.is_file():
        return 0
    with path.open("rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        keep = _end_of_last_line(handle, size)
        if keep < size:
            handle.truncate(keep)
    if keep < size:
        print(
            f"warning: {path} ended in a partial record (a write cut short); dropped its last {size - keep} bytes",
            file=sys.stderr,
        )
    return size - keep


def _end_of_last_line(handle, size: int, chunk: int = 1 << 16) -> int:
    """The offset just after the file's last newline (0 if it has none)."""
    position = size
    while position > 0:
        start = max(0, position - chunk)
        handle.seek(start)
        block = handle.read(position - start)
        if start + len(block) == size and block.endswith(b"\n"):
            return size
        newline = block.rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        position = start
    return 0


def unreadable(spec: str, err: Exception) -> ConfigError:
    """The one-line error for a storage Optuna cannot read."""
    return ConfigError(
        f"study.storage={spec} cannot be read ({type(err).__name__}: {one_line(err, 300)}); "
        "restore it from a backup or give the study another study.name"
    )
