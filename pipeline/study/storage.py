"""A study's Optuna storage: where it lives by default, and how a storage spec is opened.

A spec is an RDB URL (``sqlite:///...``, ``postgresql://...``) or the path of a ``*.journal`` file
(the default: ``<study.output_dir>/<study.name>/optuna.journal``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

from pipeline.config import ConfigError, one_line, stores
from pipeline.record.uris import sqlite_path

JOURNAL_NAME = "optuna.journal"
#: Optuna's journal storage, written below its public API so that a trial's user attributes cost one
#: append (lock, write, fsync) rather than one each (``set_user_attrs``); without them, one each.
#: And a study's own fields, so that asking for a new trial skips Study.ask's scan of every trial
#: for a WAITING one (``ask_new``); without them, Study.ask.
PRIVATE_OPTUNA_APIS = (
    ("optuna.storages.journal._storage", "JournalOperation"),
    ("optuna.storages.journal._storage", "JournalStorage._sync_with_backend"),
)
#: Where Optuna's journal file backend keeps each record's file offset (pruned by ``JournalFile``).
JOURNAL_FILE_OFFSETS = "_log_number_offset"
JOURNAL_STORAGE_FIELDS = ("_backend", "_thread_lock", "_replay_result")  # a JournalStorage's own
STUDY_FIELDS = ("_storage", "_study_id", "_thread_local")  # an optuna.Study's own


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
        from optuna.storages import JournalStorage

        Path(spec).parent.mkdir(parents=True, exist_ok=True)  # Optuna makes the file, not its folder
        return JournalStorage(_journal_file()(spec))
    if spec.startswith(DATABASE_SERVERS):
        return _database_server(spec)
    return spec


def ask_new(study):
    """``study.ask()`` for a study with no WAITING trial (none enqueued): a new trial.

    Study.ask first looks through every trial of the study for a WAITING one to run, which costs
    time growing with the study (~10 ms an ask at 10^5 trials, more than the rest of a trial's
    share of the driver); the driver knows when none is waiting.
    """
    import optuna

    if not all(hasattr(study, field) for field in STUDY_FIELDS):
        return study.ask()
    study._thread_local.cached_all_trials = None  # as Study.ask: the new trial is not in any cache
    return optuna.Trial(study, study._storage.create_new_trial(study._study_id))


@functools.lru_cache(maxsize=1)
def _journal_file():
    """Optuna's journal file backend, whose appends can be held and written as one (``held_appends``)."""
    from optuna.storages.journal import JournalFileBackend

    class JournalFile(JournalFileBackend):
        held: Optional[list] = None

        def append_logs(self, logs: list) -> None:
            if self.held is None:
                super().append_logs(logs)
            else:
                self.held.extend(logs)

        def read_logs(self, log_number_from: int):
            # Optuna's backend remembers the file offset of every record it has read (~1.4 KB a
            # trial, 140 MB over 10^5 trials), where a storage only ever reads on from its last.
            for log in super().read_logs(log_number_from):
                yield _names_interned(log)
            offsets = getattr(self, JOURNAL_FILE_OFFSETS, None)
            if isinstance(offsets, dict) and len(offsets) > 2:
                last = max(offsets)
                setattr(self, JOURNAL_FILE_OFFSETS, {0: 0, last: offsets[last]})

    return JournalFile


def _names_interned(log: dict) -> dict:
    """A journal record whose param and attribute names are shared strings: Optuna keeps every
    trial's, each decoded anew (~0.5 KB a trial)."""
    if "param_name" in log:
        log["param_name"] = sys.intern(log["param_name"])
    for field in ("user_attr", "system_attr"):
        if isinstance(log.get(field), dict):
            log[field] = {sys.intern(key): value for key, value in log[field].items()}
    return log


@contextlib.contextmanager
def held_appends(study) -> Iterator[None]:
    """The journal records written inside, written at its end in one append (one lock, write and
    fsync: ~0.4 ms each with its read back). For a trial's suggests, which each write a record:
    until the end, Optuna's copy of the trial lacks the params suggested inside (the suggests'
    own answers, which the space uses, do not), so nothing inside may read them back."""
    backend = getattr(getattr(study, "_storage", None), "_backend", None)
    if not isinstance(backend, _journal_file()) or backend.held is not None:
        yield
        return
    backend.held = []
    try:
        yield
    finally:
        logs, backend.held = backend.held, None
        if logs:
            backend.append_logs(logs)


def set_user_attrs(trial, attrs: dict) -> None:
    """A trial's user attributes, in one append to a journal storage (a study trial sets seven: one
    append each was ~1.5 ms of the driver's ~7 ms a trial); one by one on any other storage."""
    storage = trial.storage
    if not (type(storage).__name__ == "JournalStorage" and all(hasattr(storage, f) for f in JOURNAL_STORAGE_FIELDS)):
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return
    from optuna.storages.journal._storage import JournalOperation

    worker = storage._replay_result.worker_id
    logs = [
        {
            "op_code": JournalOperation.SET_TRIAL_USER_ATTR,
            "worker_id": worker,
            "trial_id": trial._trial_id,
            "user_attr": {key: value},
        }
        for key, value in attrs.items()
    ]
    with storage._thread_lock:
        storage._backend.append_logs(logs)
        storage._sync_with_backend()
    trial._cached_frozen_trial.user_attrs.update(attrs)


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
