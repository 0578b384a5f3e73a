"""A study's journal reopened from its snapshot holds what a full replay of the file holds, and a
snapshot that no longer matches the file is ignored (pipeline/study/optuna_journal.py)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import optuna
import pytest

from pipeline.study.optuna_journal import SNAPSHOT_SUFFIX, ask_new, open_journal, save_snapshot, set_user_attrs

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _add_trials(path: str, values: range) -> None:
    study = optuna.load_study(study_name="snap", storage=open_journal(path))
    for value in values:
        trial = ask_new(study)
        trial.suggest_float("scale", 0.1, 10.0, log=True)
        trial.suggest_categorical("activation", ["relu", "tanh"])
        set_user_attrs(trial, {"seeds": [0], "n_seeds": 1})
        study.tell(trial, float(value))


def _trials(storage) -> list[tuple]:
    study = optuna.load_study(study_name="snap", storage=storage)
    return [(t.number, t.state.name, t.value, t.params, t.user_attrs) for t in study.trials]


def _records(path: str) -> int:
    with open(path, "rb") as handle:
        return sum(1 for _ in handle)


@pytest.fixture
def journal(tmp_path) -> str:
    path = str(tmp_path / "optuna.journal")
    optuna.create_study(study_name="snap", storage=open_journal(path))
    _add_trials(path, range(30))
    return path


def _records_read(monkeypatch) -> list:
    from optuna.storages.journal import JournalFileBackend

    read = []
    original = JournalFileBackend.read_logs

    def counting(self, log_number_from):
        for log in original(self, log_number_from):
            read.append(log)
            yield log

    monkeypatch.setattr(JournalFileBackend, "read_logs", counting)
    return read


def test_a_study_reopens_from_its_snapshot_replaying_only_the_records_after_it(journal, monkeypatch):
    assert save_snapshot(open_journal(journal))
    before = _records(journal)
    _add_trials(journal, range(30, 35))  # written after the snapshot, by another process
    read = _records_read(monkeypatch)
    from_snapshot = _trials(open_journal(journal))
    assert len(read) == _records(journal) - before > 0  # the five later trials' records, no more
    monkeypatch.undo()
    Path(journal + SNAPSHOT_SUFFIX).unlink()
    assert from_snapshot == _trials(open_journal(journal))  # what a full replay gives
    assert [value for _, _, value, _, _ in from_snapshot] == list(range(35))


@pytest.mark.parametrize("damage", ["rewritten before it", "cut short", "another Optuna"])
def test_a_snapshot_that_no_longer_matches_its_journal_is_ignored(journal, monkeypatch, damage):
    assert save_snapshot(open_journal(journal))
    path = Path(journal)
    if damage == "rewritten before it":
        text = path.read_bytes()
        damaged = re.sub(rb'("n_seeds":\s*)1', rb"\g<1>7", text, count=1)
        assert damaged != text
        path.write_bytes(damaged)
    elif damage == "cut short":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2].rsplit(b"\n", 1)[0] + b"\n")
    else:
        snapshot = pickle.loads(Path(journal + SNAPSHOT_SUFFIX).read_bytes())
        Path(journal + SNAPSHOT_SUFFIX).write_bytes(pickle.dumps({**snapshot, "optuna": "0.0.1"}))
    read = _records_read(monkeypatch)
    reopened = _trials(open_journal(journal))
    assert len(read) == _records(journal)  # every record replayed: the snapshot was not used
    if damage == "rewritten before it":
        assert reopened[0][4]["n_seeds"] == 7  # the file's truth, not the snapshot's


@pytest.mark.parametrize("from_snapshot", [False, True], ids=["replayed", "from a snapshot"])
def test_reopened_trials_share_equal_distributions_and_names(journal, from_snapshot):
    if from_snapshot:
        assert save_snapshot(open_journal(journal))
    trials = optuna.load_study(study_name="snap", storage=open_journal(journal)).trials
    first, last = trials[0], trials[-1]
    assert first.distributions["scale"] is last.distributions["scale"]  # one object, not one per trial
    assert next(iter(first.params)) is next(iter(last.params))  # the name too
    assert first.distributions["scale"] == optuna.distributions.FloatDistribution(0.1, 10.0, log=True)
