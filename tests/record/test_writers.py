"""Writer processes write a study's runs as the driver would (pipeline/record/writers.py): each run
once and in order, its id and end reported back, none left RUNNING when the driver vanishes."""

from __future__ import annotations

import time

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import config_from_dict
from pipeline.config.composition import compose
from pipeline.record import journal
from pipeline.record.writers import WriterFailed, Writers
from tests.conftest import TINY

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def tracking(tmp_path):
    config = compose([*TINY, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_root={tmp_path}/a"])
    from pipeline.record.store import open_store

    open_store(config["tracking"]["uri"])
    return config_from_dict(config).tracking


def _journal_flushes(tracking, runs: int, epochs: int) -> list[tuple[str, list]]:
    """``runs`` journals of ``epochs`` points each, a flush per epoch, interleaved run by run."""
    flushes: list[tuple[str, list]] = []
    starter = journal.journal_starter(lambda key, ops: flushes.append((key, ops)))
    handles = [starter(tracking, "written", run_name=f"run-{i}", tags={"index": i}) for i in range(runs)]
    for step in range(epochs):
        for i, run in enumerate(handles):
            run.log_metrics(step, {"val_accuracy": i + step / 100})
            run.flush()
    for run in handles:
        run.end("FINISHED")
    return flushes


def _until(writers: Writers, done, timeout_s: float = 60) -> None:
    end = time.monotonic() + timeout_s
    while not done() and time.monotonic() < end:
        writers.poll(0.2)
    assert done(), "the writers did not answer in time"


@pytest.mark.parametrize("processes", [0, 3])
def test_every_run_is_written_once_in_order_and_reported_ended(tracking, processes):
    flushes = _journal_flushes(tracking, runs=12, epochs=5)
    keys = list(dict.fromkeys(key for key, _ in flushes))
    writers = Writers(tracking, processes)
    try:
        for key, ops in flushes:
            writers.write(key, ops)
        _until(writers, lambda: writers.ended.issuperset(keys))
        client = MlflowClient(tracking.uri)
        for key in keys:
            run = client.get_run(writers.run_ids[key])
            index = int(run.data.tags["index"])
            history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
            assert run.info.status == "FINISHED" and run.info.run_name == f"run-{index}"
            assert sorted(history) == [(step, index + step / 100) for step in range(5)]
        writers.tag(keys[:2], {"optuna_state": "PRUNED"})
        writers.forget(keys)
        writers.sync()
    finally:
        writers.close()
    experiment = client.get_experiment_by_name("written").experiment_id
    found = client.search_runs([experiment], max_results=100)
    assert len(found) == 12  # once each
    assert sum(r.data.tags.get("optuna_state") == "PRUNED" for r in found) == 2
    assert not writers.run_ids and not writers.ended  # forgotten: a long study keeps nothing per run


def test_runs_a_dead_worker_left_open_are_ended_failed_and_reported(tracking):
    flushes = _journal_flushes(tracking, runs=2, epochs=2)
    opened = [(key, ops) for key, ops in flushes if ops[-1][0] != "end"]  # the ends never came: it died
    keys = list(dict.fromkeys(key for key, _ in opened))
    writers = Writers(tracking, 2)
    try:
        for key, ops in opened:
            writers.write(key, ops)
        writers.end_open(keys, "worker died: WorkerCrashedError")
        _until(writers, lambda: writers.ended.issuperset(keys))
        runs = [MlflowClient(tracking.uri).get_run(writers.run_ids[key]) for key in keys]
        assert [r.info.status for r in runs] == ["FAILED", "FAILED"]
        assert {r.data.tags["failure_reason"] for r in runs} == {"worker died: WorkerCrashedError"}
    finally:
        writers.close()


def test_a_writer_whose_driver_vanishes_ends_its_open_runs_failed(tracking):
    flushes = _journal_flushes(tracking, runs=1, epochs=2)
    key, ops = flushes[0]  # opened, never ended
    writers = Writers(tracking, 1)
    writers.write(key, ops)
    _until(writers, lambda: key in writers.run_ids)
    channel = writers.channels[0]
    channel.connection.close()  # what a SIGKILLed driver leaves the writer: a closed socket
    assert channel.process.wait(60) == 0
    run = MlflowClient(tracking.uri).get_run(writers.run_ids[key])
    assert run.info.status == "FAILED" and run.data.tags["failure_reason"] == "the study's driver stopped"


def test_a_writer_that_fails_is_an_error_naming_its_cause(tracking):
    writers = Writers(tracking, 1)
    try:
        writers.write("journal-never-opened", [("tags", {"a": "b"})])
        with pytest.raises(WriterFailed, match="KeyError: 'journal-never-opened'"):
            _until(writers, lambda: False, timeout_s=60)
    finally:
        writers.close()
