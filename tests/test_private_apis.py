"""Private APIs of Ray, MLflow and Optuna that we use for speed: each is named in one place in the
code, and this test fails loudly when an upgrade removes one (the code then falls back, slowly, or
breaks: either way the upgrade needs a look)."""

from __future__ import annotations

import importlib

import optuna
import pytest

from pipeline.record.store import PRIVATE_MLFLOW_APIS
from pipeline.record.tables import COLUMNS_READ, COLUMNS_WRITTEN, MODELS, PRIVATE_MLFLOW_TABLES
from pipeline.study.cluster import PRIVATE_RAY_APIS
from pipeline.study.optuna_journal import (
    JOURNAL_STORAGE_FIELDS,
    PRIVATE_OPTUNA_APIS,
    STUDY_FIELDS,
    ask_new,
    set_user_attrs,
)
from pipeline.study.storage import open_storage

PRIVATE_APIS = [*PRIVATE_MLFLOW_APIS, *PRIVATE_MLFLOW_TABLES, *PRIVATE_RAY_APIS, *PRIVATE_OPTUNA_APIS]


@pytest.mark.parametrize("module, attribute", PRIVATE_APIS, ids=lambda x: str(x))
def test_each_private_api_we_use_still_exists(module, attribute):
    owner = importlib.import_module(module)
    for part in attribute.split("."):  # "Class.method": the method of a class of the module
        assert hasattr(owner, part), f"{module}.{attribute} is gone: see where it is used"
        owner = getattr(owner, part)


@pytest.mark.parametrize("model, columns", COLUMNS_READ.items(), ids=lambda x: str(x))
def test_each_mlflow_column_the_bulk_reads_query_still_exists(model, columns):
    # pipeline/record/tables.py reads a study's runs straight from MLflow's tables.
    table = getattr(importlib.import_module(MODELS), model).__table__
    assert set(columns) <= set(table.columns.keys()), f"{model} lost {set(columns) - set(table.columns.keys())}"


def test_a_trials_user_attributes_go_to_the_journal_in_one_append_and_read_back_as_set(tmp_path):
    path = str(tmp_path / "optuna.journal")
    study = optuna.create_study(storage=open_storage(path), study_name="attrs")
    assert all(hasattr(study._storage, field) for field in JOURNAL_STORAGE_FIELDS)  # else: one append each
    appends = []
    backend = study._storage._backend
    append = backend.append_logs
    backend.append_logs = lambda logs: (appends.append(len(logs)), append(logs))
    trial = study.ask()
    attrs = {"seeds": [0, 1], "run_ids": ["a", "b"], "val_accuracy_std": 0.01, "n_seeds": 2}
    set_user_attrs(trial, attrs)
    assert appends[-1] == len(attrs) and len(appends) == 2  # the trial's creation, then the attributes at once
    assert trial.user_attrs == attrs
    study.tell(trial, 0.5)
    reread = optuna.load_study(study_name="attrs", storage=open_storage(path)).trials[0]
    assert reread.user_attrs == attrs and reread.value == 0.5


def test_a_trials_user_attributes_go_to_a_database_in_one_transaction_and_read_back_as_set(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(storage=url, study_name="attrs")
    trial = study.ask()
    rdb = study._storage._backend  # Optuna wraps its RDBStorage in a cache
    rdb.set_trial_user_attr = lambda *a, **k: pytest.fail("one transaction an attribute")
    attrs = {"seeds": [0, 1], "run_ids": ["a", "b"], "val_accuracy_std": 0.01, "n_seeds": 2}
    set_user_attrs(trial, attrs)
    assert trial.user_attrs == attrs
    study.tell(trial, 0.5)
    reread = optuna.load_study(study_name="attrs", storage=url).trials[0]
    assert reread.user_attrs == attrs and reread.value == 0.5


def test_a_trials_suggests_held_go_to_a_database_in_one_transaction_and_read_back_as_suggested(tmp_path):
    from sqlalchemy import event

    from pipeline.study.optuna_journal import held_appends

    url = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(storage=url, study_name="held", sampler=optuna.samplers.RandomSampler(0))
    study.tell(study.ask({"depth": optuna.distributions.IntDistribution(1, 8)}), 0.1)  # a distribution to check against
    commits = []
    event.listen(study._storage._backend.engine, "commit", lambda connection: commits.append(1))
    trial = ask_new(study)
    commits.clear()
    with held_appends(study):
        suggested = {
            "scale": trial.suggest_float("scale", 0.01, 100.0, log=True),
            "activation": trial.suggest_categorical("activation", ["relu", "tanh"]),
            "depth": trial.suggest_int("depth", 1, 8),
        }
        assert not commits  # nothing written yet
    assert len(commits) == 1  # the three params in one transaction
    study.tell(trial, 0.5)
    reread = optuna.load_study(study_name="held", storage=url).trials[1]
    assert reread.params == suggested and reread.value == 0.5
    with pytest.raises(ValueError, match="different distribution"), held_appends(study):  # still checked
        ask_new(study).suggest_categorical("depth", ["a", "b"])


def test_an_asked_trials_storage_id_is_still_trial_id(tmp_path):
    # The driver hands a trial's storage id to the pruning oracle and re-opens interrupted trials by it.
    study = optuna.create_study()
    trial = study.ask()
    assert isinstance(trial._trial_id, int)
    assert optuna.trial.Trial(study, trial._trial_id).number == trial.number


def test_asking_for_a_new_trial_makes_the_trial_study_ask_would_without_scanning_the_study(tmp_path):
    study = optuna.create_study(storage=open_storage(str(tmp_path / "optuna.journal")), study_name="ask")
    assert all(hasattr(study, field) for field in STUDY_FIELDS)  # else: Study.ask, scan and all
    first = study.ask()
    study.tell(first, 0.1)
    scans = []
    get_all_trials = study._storage.get_all_trials
    study._storage.get_all_trials = lambda *a, **kw: (scans.append(kw.get("states")), get_all_trials(*a, **kw))[1]
    trial = ask_new(study)
    assert not scans  # no look through every trial for a WAITING one
    assert trial.number == 1 and trial.suggest_float("scale", 0.1, 10.0, log=True) > 0
    study.tell(trial, 0.2)
    assert [(t.number, t.state.name, t.value) for t in study.trials] == [(0, "COMPLETE", 0.1), (1, "COMPLETE", 0.2)]


def test_a_trials_suggests_held_go_to_the_journal_in_one_append_and_read_back_as_suggested(tmp_path, monkeypatch):
    from optuna.storages.journal import JournalFileBackend

    from pipeline.study.optuna_journal import held_appends

    path = str(tmp_path / "optuna.journal")
    study = optuna.create_study(storage=open_storage(path), study_name="held")
    appends = []
    append = JournalFileBackend.append_logs  # what reaches the file
    monkeypatch.setattr(
        JournalFileBackend, "append_logs", lambda self, logs: (appends.append(len(logs)), append(self, logs))
    )
    trial = ask_new(study)
    with held_appends(study):
        suggested = {
            "scale": trial.suggest_float("scale", 0.01, 100.0, log=True),
            "activation": trial.suggest_categorical("activation", ["relu", "tanh"]),
            "depth": trial.suggest_int("depth", 1, 8),
        }
    assert appends == [1, 3]  # the trial's creation, then its three params at once
    assert study._storage.get_trial(trial._trial_id).params == suggested  # read back once written
    study.tell(trial, 0.5)
    reread = optuna.load_study(study_name="held", storage=open_storage(path)).trials[0]
    assert reread.params == suggested and reread.value == 0.5


def test_the_journal_keeps_no_offset_per_record_and_reads_on_from_its_last(tmp_path):
    from optuna.storages.journal import JournalFileBackend

    from pipeline.study.optuna_journal import JOURNAL_FILE_OFFSETS

    path = str(tmp_path / "optuna.journal")
    assert hasattr(JournalFileBackend(path), JOURNAL_FILE_OFFSETS)  # what the project's backend prunes
    study = optuna.create_study(storage=open_storage(path), study_name="offsets")
    for value in range(20):
        trial = ask_new(study)
        trial.suggest_float("scale", 0.1, 10.0)
        set_user_attrs(trial, {"seeds": [0], "n_seeds": 1})
        study.tell(trial, value)
    assert len(getattr(study._storage._backend, JOURNAL_FILE_OFFSETS)) <= 2  # Optuna's own: one per record
    other = optuna.load_study(study_name="offsets", storage=open_storage(path))
    other.tell(ask_new(other), 20.0)  # another process's writes...
    assert [t.value for t in study.trials] == list(range(21))  # ...read on from where this one was


@pytest.mark.parametrize("model, columns", COLUMNS_WRITTEN.items(), ids=lambda x: str(x))
def test_the_bulk_writes_fill_every_column_of_mlflows_tables(model, columns):
    # pipeline/record/tables.py inserts whole runs: a column MLflow adds must be looked at (and filled).
    table = getattr(importlib.import_module(MODELS), model).__table__
    assert set(columns) == set(table.columns.keys()), f"{model}: {set(table.columns.keys()) ^ set(columns)}"
