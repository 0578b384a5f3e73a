"""A study worker's journaled record, written to the store by the driver, is the record a trial
writes itself (pipeline/record/journal.py); and a worker that journals never imports MLflow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import config_from_dict
from pipeline.config.composition import compose
from pipeline.record import journal
from pipeline.record.runner import TrialRequest, run_recorded_batch, run_recorded_trial
from pipeline.record.writers import handle_all
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[2]
# Differ between two runs of one trial by nature: ids, times, the process.
PER_RUN_TAGS = {"reproduce", "mlflow.runName", "pid"}
PER_RUN_METRICS = {"wall_time_s"}


@pytest.fixture
def store(tmp_path) -> list[str]:
    return [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_root={tmp_path}/artifacts"]


def _journaled(config: dict, experiment: str, **request) -> tuple[list, list[tuple[str, list]]]:
    """Run ``config`` through the runner with journal runs; the outcomes and every flush, in order."""
    flushes: list[tuple[str, list]] = []
    outcomes = run_recorded_batch(
        [TrialRequest(config, experiment, **request)],
        journal.journal_starter(lambda key, ops: flushes.append((key, ops))),
    )
    return outcomes, flushes


def _replayed(config: dict, flushes: list[tuple[str, list]]) -> journal.Replay:
    """As a writer applies them: a whole run's flush in bulk (pipeline/record/tables.py)."""
    replay = journal.Replay(config_from_dict(config).tracking)
    handle_all(replay, [("write", key, ops) for key, ops in flushes])
    return replay


def _artifacts(client, run_id: str, path: str | None = None) -> dict[str, int]:
    found = {}
    for info in client.list_artifacts(run_id, path):
        found.update(_artifacts(client, run_id, info.path) if info.is_dir else {info.path: info.file_size})
    return found


def _record(client, run_id: str) -> dict:
    run = client.get_run(run_id)
    histories = {
        key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        for key in run.data.metrics
        if key not in PER_RUN_METRICS
    }
    tags = {k: v for k, v in run.data.tags.items() if k not in PER_RUN_TAGS}
    return {
        "status": run.info.status,
        "params": run.data.params,
        "tags": tags,
        "metrics": histories,
        "artifacts": _artifacts(client, run_id),
    }


def test_a_journaled_trial_records_what_a_trial_recording_itself_does(store, monkeypatch):
    monkeypatch.setattr(journal, "FLUSH_EVERY_S", 120.0)  # "short" whatever the machine's load
    config = compose([*TINY, *store, "train.epochs=3", "activation=tanh", "tracking.layer_plot=true"])
    direct = run_recorded_trial(config, experiment="direct")
    outcomes, flushes = _journaled(config, "journaled")
    replay = _replayed(config, flushes)

    client = MlflowClient(store[0].partition("=")[2])
    run_id = replay.run_id(outcomes[0].run_id)
    assert run_id is not None and not replay.open_runs([outcomes[0].run_id])
    assert _record(client, run_id) == _record(client, direct.run_id)
    assert client.get_run(run_id).data.tags["reproduce"] == f"python -m pipeline reproduce {run_id}"
    # The worker's times, not the driver's: the run spans its metrics' timestamps.
    run = client.get_run(run_id)
    stamps = [m.timestamp for m in client.get_metric_history(run_id, "val_accuracy")]
    assert run.info.start_time <= min(stamps) <= max(stamps) <= run.info.end_time
    assert run.info.start_time == flushes[0][1][0][1]["start_ms"]
    assert len(flushes) == 1  # a short trial's whole record in one flush: one create, one batch, one end


def test_a_journaled_trial_that_raises_ends_its_run_failed_with_the_reason(store, monkeypatch):
    def explode(prepared, report):
        report(0, {"val_accuracy": 0.1})
        raise RuntimeError("boom in training")

    monkeypatch.setattr("pipeline.record.runner.train_trial", explode)
    config = compose([*TINY, *store])
    flushes: list = []
    with pytest.raises(RuntimeError):
        run_recorded_batch(
            [TrialRequest(config, "exploding")], journal.journal_starter(lambda k, ops: flushes.append((k, ops)))
        )
    replay = _replayed(config, flushes)
    run = MlflowClient(store[0].partition("=")[2]).get_run(replay.run_id(flushes[0][0]))
    assert run.info.status == "FAILED" and "RuntimeError: boom in training" in run.data.tags["failure_reason"]
    assert run.data.metrics["val_accuracy"] == 0.1  # what it logged before it failed is kept


def test_a_refused_member_gets_a_journaled_failed_run(store):
    config = compose([*TINY, *store, "normalization=group", "normalization.groups=7"])
    outcomes, flushes = _journaled(config, "refused", tags={"optuna_trial": 3})
    replay = _replayed(config, flushes)
    assert "groups=7" in str(outcomes[0])
    run = MlflowClient(store[0].partition("=")[2]).get_run(replay.run_id(flushes[0][0]))
    assert run.info.status == "FAILED" and "groups=7" in run.data.tags["failure_reason"]
    assert journal.opening_tags(flushes[0][1])["optuna_trial"] == "3"


def test_runs_a_dead_worker_left_open_are_ended_failed_by_the_driver(store):
    config = compose([*TINY, *store])
    flushes: list = []
    run = journal.journal_starter(lambda k, ops: flushes.append((k, ops)))(config_from_dict(config).tracking, "dead")
    run.flush()  # its first flush (FLUSH_EVERY_S into a long trial): the run is now in the store
    run.log_metrics(0, {"val_accuracy": 0.5}, buffered=True)  # never flushed: the worker died
    replay = _replayed(config, flushes)
    assert replay.open_runs([run.run_id]) == [run.run_id]
    assert replay.end_open([run.run_id], "worker died: WorkerCrashedError") == [run.run_id]
    record = MlflowClient(store[0].partition("=")[2]).get_run(replay.run_id(run.run_id))
    assert record.info.status == "FAILED" and record.data.tags["failure_reason"] == "worker died: WorkerCrashedError"
    assert replay.end_open([run.run_id], "again") == []


def test_a_worker_trains_and_journals_without_importing_mlflow(store):
    """MLflow's import and store are ~2 CPU-seconds of a worker's start-up: a worker never pays them."""
    script = f"""
import sys
from pipeline.config.composition import compose
from pipeline.record.journal import journal_starter
from pipeline.record.runner import TrialRequest, run_recorded_batch
from tests.conftest import TINY
flushes = []
config = compose([*TINY, *{store!r}])
outcomes = run_recorded_batch([TrialRequest(config, 'x'), TrialRequest(config, 'x')],
                              journal_starter(lambda key, ops: flushes.append(ops)))
assert len(outcomes) == 2 and flushes, flushes
print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'sqlalchemy', 'alembic')))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
