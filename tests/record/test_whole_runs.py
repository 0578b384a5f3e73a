"""A whole run written in bulk (pipeline/record/tables.py ``insert_runs``) reads back from MLflow
exactly as the same run written through MLflow's own API: info, params, tags, latest metrics,
every metric's history (NaN, infinities and repeats included), artifacts, search by tag."""

from __future__ import annotations

import math

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import config_from_dict
from pipeline.config.composition import compose
from pipeline.record import journal, names
from pipeline.record.runs import start_run
from pipeline.record.writers import handle_all
from tests.conftest import TINY


@pytest.fixture
def tracking(tmp_path):
    config = compose([*TINY, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_root={tmp_path}/a"])
    return config_from_dict(config).tracking


def _whole_journal(tracking, parent_run_id: str, index: int, status: str, tmp_path) -> list[tuple]:
    """One flush holding a whole run, as a short trial's worker sends it."""
    flushes: list[tuple[str, list]] = []
    run = journal.journal_starter(lambda key, ops: flushes.append((key, ops)))(
        tracking,
        "whole",
        parent_run_id=parent_run_id,
        run_name=f"trial-{index}",
        tags={"trial": index},
        reproducible=True,
    )
    run.log_params({"model.depth": "3", "long": "x" * 7000}, tags={"optuna_state": "RUNNING"}, buffered=True)
    for step, value in enumerate([0.5, math.nan, math.inf, -math.inf]):
        run.log_metrics(step, {"val_loss": value, "val_accuracy": 0.1 * step + index}, buffered=True)
    run.log_metrics(3, {"val_accuracy": 0.3 + index, "final_accuracy": 0.25}, buffered=True)  # a repeat, and new keys
    run.set_tags({"optuna_state": "COMPLETE", "diverged": "false"}, buffered=True)
    (tmp_path / "files").mkdir(exist_ok=True)
    (tmp_path / "files" / "config.yaml").write_text(f"trial: {index}\n")
    run.log_dir(tmp_path / "files")
    run.end(status, reason="ValueError: boom" if status == "FAILED" else None)
    assert len(flushes) == 1, "a short run travels in one flush"
    return flushes[0][1]


def _written(tracking, whole: bool, tmp_path) -> dict[str, str]:
    """Two runs (FINISHED, FAILED) written by a writer's ``Replay``, in bulk or through MLflow's API."""
    parent = start_run(tracking, "whole", run_name="study")
    replay = journal.Replay(tracking)
    replay.writes_whole = whole
    messages = [
        ("write", f"k{i}", _whole_journal(tracking, parent.run_id, i, s, tmp_path))
        for i, s in enumerate(["FINISHED", "FAILED"])
    ]
    answers = handle_all(replay, messages)
    assert sorted(a[0] for a in answers) == ["ended", "ended", "opened", "opened"]
    parent.end("FINISHED")
    return {"parent": parent.run_id, **{key: replay.run_id(key) for key in ("k0", "k1")}}


def _read_back(client: MlflowClient, run_id: str, parent_id: str) -> dict:
    run = client.get_run(run_id)
    info = run.info
    tags = {k: v.replace(run_id, "RUN") for k, v in run.data.tags.items()}
    tags[names.PARENT_RUN_TAG] = tags[names.PARENT_RUN_TAG].replace(parent_id, "PARENT")
    histories = {
        key: sorted(
            (m.step, m.timestamp, m.value if not math.isnan(m.value) else "nan")
            for m in client.get_metric_history(run_id, key)
        )
        for key in run.data.metrics
    }
    return {
        "info": (info.status, info.start_time, info.end_time, info.run_name, info.user_id, info.lifecycle_stage),
        "artifact_uri_ends": info.artifact_uri.endswith(f"/{run_id}/artifacts"),
        "params": run.data.params,
        "tags": tags,
        "metrics": {k: "nan" if math.isnan(v) else v for k, v in run.data.metrics.items()},
        "histories": histories,
        "artifacts": [f.path for f in client.list_artifacts(run_id)],
    }


def test_a_run_written_in_bulk_reads_back_as_mlflow_writes_it(tracking, tmp_path, monkeypatch):
    times = iter(range(1_000_000, 2_000_000, 7))  # the same clock on both sides
    monkeypatch.setattr(journal, "_now_ms", lambda: next(times))
    through_mlflow = _written(tracking, whole=False, tmp_path=tmp_path)
    times = iter(range(1_000_000, 2_000_000, 7))
    in_bulk = _written(tracking, whole=True, tmp_path=tmp_path)
    client = MlflowClient(tracking.uri)
    for key in ("k0", "k1"):
        expected = _read_back(client, through_mlflow[key], through_mlflow["parent"])
        got = _read_back(client, in_bulk[key], in_bulk["parent"])
        assert got == expected
        assert got["artifact_uri_ends"] and got["artifacts"] == ["config.yaml"]
    assert len(expected["params"]["long"]) == 6000 and expected["tags"][names.FAILURE_REASON_TAG] == "ValueError: boom"
    assert expected["metrics"]["val_loss"] < -1e308  # the last step's -inf, as MLflow stores it


def test_runs_written_in_bulk_are_found_by_mlflow_search(tracking, tmp_path):
    ids = _written(tracking, whole=True, tmp_path=tmp_path)
    client = MlflowClient(tracking.uri)
    experiment = client.get_experiment_by_name("whole")
    children = client.search_runs([experiment.experiment_id], f"tags.`{names.PARENT_RUN_TAG}` = '{ids['parent']}'")
    assert sorted(r.info.run_id for r in children) == sorted([ids["k0"], ids["k1"]])
    failed = client.search_runs(
        [experiment.experiment_id], "attributes.status = 'FAILED' and metrics.final_accuracy > 0.2"
    )
    assert [r.info.run_id for r in failed] == [ids["k1"]]


def test_a_long_runs_flushes_go_through_mlflow_while_whole_runs_go_in_bulk(tracking, tmp_path):
    replay = journal.Replay(tracking)
    assert replay.writes_whole  # a sqlite store
    parent = start_run(tracking, "whole", run_name="study")
    flushes: list[tuple[str, list]] = []
    long = journal.journal_starter(lambda key, ops: flushes.append((key, ops)))(tracking, "whole", run_name="long")
    long.log_metrics(0, {"val_accuracy": 0.5})  # flushed at once: the run is RUNNING meanwhile
    handle_all(replay, [("write", key, ops) for key, ops in flushes])
    (key,) = replay.runs
    assert MlflowClient(tracking.uri).get_run(replay.run_id(key)).info.status == "RUNNING"
    whole = _whole_journal(tracking, parent.run_id, 0, "FINISHED", tmp_path)
    long.end("FINISHED")
    handle_all(replay, [("write", "short", whole), ("write", key, flushes[-1][1])])
    client = MlflowClient(tracking.uri)
    assert client.get_run(replay.run_id(key)).info.status == "FINISHED"
    assert client.get_run(replay.run_id("short")).data.metrics["final_accuracy"] == 0.25


@pytest.mark.parametrize(
    "uri, bulk",
    [
        ("sqlite:////tmp/x.db", True),
        ("postgresql+psycopg2://u@h:5433/mlflow", True),
        ("mysql+pymysql://u@h/mlflow", False),
        ("http://127.0.0.1:5000", False),
        ("file:///tmp/mlruns", False),
    ],
)
def test_only_the_databases_held_to_mlflows_writes_take_whole_runs_in_bulk(uri, bulk):
    from pipeline.record import tables

    assert tables.writable(uri) is bulk
