"""Optuna's journal file storage, made to keep up with a study of 10^5 trials.

Optuna's journal replays every record of the file into memory when a study opens (~0.3 ms a
trial: 30 s at 10^5 trials), writes each record with its own lock, write and fsync, keeps every
record's file offset, and Study.ask scans every trial. Here, below its public API:

- ``open_journal`` starts from a snapshot of the replayed state (``save_snapshot``: the driver
  writes one every ``SNAPSHOT_EVERY`` trials and when the study stops) and replays only the
  records after it; a snapshot that does not match the file's bytes is ignored;
- ``held_appends`` and ``set_user_attrs`` write a trial's suggests, and its user attributes, in one
  append each, or in one transaction each of a database's RDB storage;
- the backend keeps one file offset, param and attribute names are shared strings, and equal
  distributions one object;
- ``ask_new`` asks without the scan where the driver knows no trial is WAITING.

Each private name used is listed in ``PRIVATE_OPTUNA_APIS`` (or the ``*_FIELDS`` tuples), tested in
tests/test_private_apis.py; without them, Optuna's own slower ways are used.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import pickle
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

SNAPSHOT_SUFFIX = ".snapshot"
SNAPSHOT_EVERY = 5000  # trials told between the driver's snapshots (~1 s of pickling at 10^5 trials)
_CHECK_BYTES = 1 << 16  # the journal's bytes before a snapshot's offset that must be unchanged

PRIVATE_OPTUNA_APIS = (
    ("optuna.storages.journal._storage", "JournalOperation"),
    ("optuna.storages.journal._storage", "JournalStorage._sync_with_backend"),
    ("optuna.storages.journal._storage", "JournalStorage.restore_replay_result"),
    ("optuna.storages.journal._storage", "json_to_distribution"),
    ("optuna.storages._rdb.storage", "_create_scoped_session"),
    ("optuna.storages._rdb.storage", "RDBStorage._set_trial_attr_without_commit"),
    ("optuna.storages._rdb.storage", "RDBStorage._set_trial_param"),
    ("optuna.storages._rdb.storage", "RDBStorage._set_trial_param_without_commit"),
    ("optuna.storages._rdb.models", "TrialUserAttributeModel"),
    ("optuna.storages._cached_storage", "_CachedStorage"),
)
#: Where Optuna's journal file backend keeps each record's file offset (pruned by ``JournalFile``).
JOURNAL_FILE_OFFSETS = "_log_number_offset"
JOURNAL_STORAGE_FIELDS = ("_backend", "_thread_lock", "_replay_result")  # a JournalStorage's own
STUDY_FIELDS = ("_storage", "_study_id", "_thread_local")  # an optuna.Study's own


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

    _share_distributions()

    class JournalFile(JournalFileBackend):
        held: Optional[list] = None
        silent = False  # reads nothing: its storage's state comes from a snapshot

        def __init__(self, path: str) -> None:
            super().__init__(path)
            self.path = path

        def append_logs(self, logs: list) -> None:
            if self.held is None:
                super().append_logs(logs)
            else:
                self.held.extend(logs)

        def read_logs(self, log_number_from: int):
            # Optuna's backend remembers the file offset of every record it has read (~1.4 KB a
            # trial, 140 MB over 10^5 trials), where a storage only ever reads on from its last.
            if self.silent:
                return
            for log in super().read_logs(log_number_from):
                yield _names_interned(log)
            offsets = getattr(self, JOURNAL_FILE_OFFSETS, None)
            if isinstance(offsets, dict) and len(offsets) > 2:
                last = max(offsets)
                setattr(self, JOURNAL_FILE_OFFSETS, {0: 0, last: offsets[last]})

    return JournalFile


def _share_distributions() -> None:
    """One distribution object per distinct JSON in the replayed trials: the replay decodes one per
    trial and param (~1 KB a trial), all equal; Optuna never changes a distribution in place."""
    from optuna.storages.journal import _storage

    if not hasattr(_storage.json_to_distribution, "cache_info"):
        _storage.json_to_distribution = functools.lru_cache(maxsize=4096)(_storage.json_to_distribution)


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
    """The params a trial's suggests set inside, written at its end at once: in one append to a
    journal (one lock, write and fsync: ~0.4 ms each with its read back), or in one transaction of
    a database's (each its own was ~1.6 ms on PostgreSQL). Until the end, Optuna's copy of the
    trial lacks the params suggested inside (the suggests' own answers, which the space uses, do
    not), so nothing inside may read them back."""
    storage = getattr(study, "_storage", None)
    backend, rdb = getattr(storage, "_backend", None), _rdb_storage(storage)
    if isinstance(backend, _journal_file()) and backend.held is None:
        with _held_journal_records(backend):
            yield
    elif rdb is not None and "_set_trial_param" not in vars(rdb):
        with _held_rdb_params(rdb):
            yield
    else:
        yield


@contextlib.contextmanager
def _held_journal_records(backend) -> Iterator[None]:
    backend.held = []
    try:
        yield
    finally:
        logs, backend.held = backend.held, None
        if logs:
            backend.append_logs(logs)


@contextlib.contextmanager
def _held_rdb_params(rdb) -> Iterator[None]:
    """``RDBStorage._set_trial_param`` calls (a suggest's write, through Optuna's cache or not)
    kept, then made in one session."""
    from optuna.storages._rdb.storage import _create_scoped_session

    held: list[tuple] = []
    rdb._set_trial_param = lambda *args: held.append(args)  # this instance's, for the block alone
    try:
        yield
    finally:
        del rdb._set_trial_param
        if held:
            with _create_scoped_session(rdb.scoped_session, True) as session:
                for args in held:
                    rdb._set_trial_param_without_commit(session, *args)


def set_user_attrs(trial, attrs: dict) -> None:
    """A trial's user attributes, in one append to a journal storage (a study trial sets seven: one
    append each was ~1.5 ms of the driver's ~7 ms a trial) or one transaction of a database's
    (one each was ~2 ms); one by one on any other storage."""
    storage = trial.storage
    rdb = _rdb_storage(storage)
    if rdb is not None:
        _set_rdb_user_attrs(rdb, trial._trial_id, attrs)
    elif type(storage).__name__ == "JournalStorage" and all(hasattr(storage, f) for f in JOURNAL_STORAGE_FIELDS):
        _append_user_attrs(storage, trial._trial_id, attrs)
    else:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return
    trial._cached_frozen_trial.user_attrs.update(attrs)


def _rdb_storage(storage):
    """The ``RDBStorage`` behind ``storage`` (Optuna wraps one in a ``_CachedStorage``, which passes
    params and user attributes straight through to it), or None; None too where it lacks the
    private writes used here."""
    from optuna.storages import RDBStorage

    if type(storage).__name__ == "_CachedStorage":
        storage = getattr(storage, "_backend", None)
    writes = ("_set_trial_attr_without_commit", "_set_trial_param_without_commit")
    ready = isinstance(storage, RDBStorage) and all(hasattr(storage, name) for name in writes)
    return storage if ready else None


def _set_rdb_user_attrs(rdb, trial_id: int, attrs: dict) -> None:
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(rdb.scoped_session, True) as session:
        for key, value in attrs.items():
            rdb._set_trial_attr_without_commit(session, models.TrialUserAttributeModel, trial_id, key, value)


def _append_user_attrs(storage, trial_id: int, attrs: dict) -> None:
    from optuna.storages.journal._storage import JournalOperation

    worker = storage._replay_result.worker_id
    logs = [
        {
            "op_code": JournalOperation.SET_TRIAL_USER_ATTR,
            "worker_id": worker,
            "trial_id": trial_id,
            "user_attr": {key: value},
        }
        for key, value in attrs.items()
    ]
    with storage._thread_lock:
        storage._backend.append_logs(logs)
        storage._sync_with_backend()


def open_journal(path: str):
    """Optuna's journal storage on ``path``: from its snapshot if one matches the file, else by
    replaying every record."""
    from optuna.storages import JournalStorage

    backend = _journal_file()(path)
    snapshot = _read_snapshot(path)
    if snapshot is None:
        return JournalStorage(backend)
    backend.silent = True
    storage = JournalStorage(backend)
    backend.silent = False
    fresh = storage._replay_result
    storage.restore_replay_result(snapshot["state"])
    if storage._replay_result is fresh:  # Optuna refused it (another version): replay it all
        return JournalStorage(_journal_file()(path))
    _share_restored(storage._replay_result)
    setattr(backend, JOURNAL_FILE_OFFSETS, {0: 0, snapshot["log_number"]: snapshot["offset"]})
    with storage._thread_lock:
        storage._sync_with_backend()  # the records written after the snapshot
    return storage


def _share_restored(replay) -> None:
    """Equal distributions as one object, names as shared strings, in a restored state: a snapshot
    keeps whatever sharing the process that wrote it had (one object per trial and param, ~1 KB a
    trial, from a process that predates this)."""
    canonical: dict = {}
    for trial in getattr(replay, "_trials", {}).values():
        trial.distributions = {sys.intern(k): canonical.setdefault(d, d) for k, d in trial.distributions.items()}
        trial.params = {sys.intern(k): value for k, value in trial.params.items()}


def save_snapshot(storage) -> bool:
    """Write ``storage``'s replayed state beside its journal file (atomically); False where it is
    not the project's journal storage. Only a study's driver, which holds the study's lock, writes one."""
    backend = getattr(storage, "_backend", None)
    if not isinstance(backend, _journal_file()) or not all(hasattr(storage, f) for f in JOURNAL_STORAGE_FIELDS):
        return False
    import optuna

    with storage._thread_lock:
        storage._sync_with_backend()
        number = storage._replay_result.log_number_read
        offset = getattr(backend, JOURNAL_FILE_OFFSETS, {}).get(number)
        if offset is None:
            return False
        state = pickle.dumps(storage._replay_result, protocol=pickle.HIGHEST_PROTOCOL)
    snapshot = {
        "optuna": optuna.__version__,
        "log_number": number,
        "offset": offset,
        "check": _bytes_before(backend.path, offset),
        "state": state,
    }
    partial = Path(f"{backend.path}{SNAPSHOT_SUFFIX}.{os.getpid()}.partial")
    partial.write_bytes(pickle.dumps(snapshot, protocol=pickle.HIGHEST_PROTOCOL))
    os.replace(partial, backend.path + SNAPSHOT_SUFFIX)
    return True


def _read_snapshot(path: str) -> Optional[dict]:
    """The snapshot beside ``path`` if it is whole and the journal still holds the bytes it was taken after."""
    import optuna

    try:
        snapshot = pickle.loads(Path(path + SNAPSHOT_SUFFIX).read_bytes())
        offset = snapshot["offset"]
        if snapshot["optuna"] != optuna.__version__ or os.path.getsize(path) < offset:
            return None
        return snapshot if _bytes_before(path, offset) == snapshot["check"] else None
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, AttributeError, ValueError):
        return None


def _bytes_before(path: str, offset: int) -> str:
    """A digest of the journal's last ``_CHECK_BYTES`` bytes before ``offset`` (and of the offset)."""
    with open(path, "rb") as handle:
        start = max(0, offset - _CHECK_BYTES)
        handle.seek(start)
        return hashlib.sha256(f"{offset}:".encode() + handle.read(offset - start)).hexdigest()
