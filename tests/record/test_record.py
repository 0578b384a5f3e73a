"""The trial's MLflow record (shared/DESIGN.md section 2), read back from a real sqlite store.

A few trials are run once per module (a fresh sqlite store costs about a second to create) and
each test reads one part of their record: params, metric histories, tags, artifacts, run status.
"""

from __future__ import annotations

import contextlib
import csv
import math

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.config import AXES, ConfigError, config_from_dict
from pipeline.config.composition import compose
from pipeline.engine.train import evaluate, prepare_trial
from pipeline.engine.weights import load_weights_file
from pipeline.record import store as record_store
from pipeline.record.artifacts import download_artifact, download_weights
from pipeline.record.readback import batch_mates
from pipeline.record.runner import TrialRequest, fetch_pretrained, run_recorded_batch, run_recorded_trial
from pipeline.record.runs import local_directory, start_run
from pipeline.record.store import client, ensure_experiment
from tests.conftest import TINY

EPOCHS = 2  # TINY's train.epochs
DEPTH = 2  # TINY's model.depth


@pytest.fixture(scope="module")
def tstore(tmp_path_factory) -> list[str]:
    """One sqlite store (and artifact root) shared by the module's trials."""
    root = tmp_path_factory.mktemp("mlflow")
    return [f"tracking.uri=sqlite:///{root}/mlflow.db", f"tracking.artifact_root={root}/artifacts"]


@pytest.fixture(scope="module")
def mlflow_client(tstore) -> MlflowClient:
    return MlflowClient(tstore[0].partition("=")[2])


def _config(tstore, *overrides: str) -> dict:
    return compose([*TINY, *tstore, *overrides])


@pytest.fixture(scope="module")
def tanh_trial(tstore):
    """A finished tanh trial, initializer given by its alias (recorded by canonical name)."""
    config = _config(
        tstore,
        "initializer=glorot_uniform",
        "scale=0.5",
        "activation=tanh",
        "normalization=layer",
        "batch_size=32",
        "optimizer.lr=0.02",
    )
    return config, run_recorded_trial(config)


@pytest.fixture(scope="module")
def relu_trial(tstore):
    """A finished relu trial on the CPU (the source of the reproduce test)."""
    config = _config(tstore, "activation=relu", "train.device=cpu", "seed=7")
    return config, run_recorded_trial(config)


@pytest.fixture(scope="module")
def diverged_trial(tstore):
    config = _config(tstore, "optimizer.lr=1e8", "scale=50", "train.epochs=3")
    return config, run_recorded_trial(config)


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for info in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, info.path) if info.is_dir else {info.path}
    return found


# --- params -----------------------------------------------------------------------------------------


def test_params_are_the_five_axes_plus_the_flattened_config(tanh_trial, mlflow_client):
    config, done = tanh_trial
    params = mlflow_client.get_run(done.run_id).data.params
    assert {axis: params[axis] for axis in AXES} == {
        "initializer": "xavier_uniform",  # glorot_uniform is an alias: recorded by canonical name
        "scale": "0.5",
        "activation": "tanh",
        "normalization": "layer",
        "batch_size": "32",
    }
    assert params["model.depth"] == str(DEPTH)
    assert params["model.width"] == "32"
    assert params["optimizer.lr"] == "0.02"
    assert params["train.epochs"] == str(EPOCHS)
    assert params["initializer.name"] == "xavier_uniform"
    assert params["dataset.name"] == "digits"
    assert not any(key.startswith(("study.", "cluster.", "space.")) for key in params)  # `run` only


# --- metrics ----------------------------------------------------------------------------------------


def test_curves_are_logged_per_epoch_with_the_initialization_at_step_zero(tanh_trial, mlflow_client):
    _, done = tanh_trial
    run_id = done.run_id
    for key in ("val_accuracy", "val_loss"):
        assert _steps(mlflow_client, run_id, key) == list(range(EPOCHS + 1)), key
    for key in ("train_loss", "train_accuracy"):
        assert _steps(mlflow_client, run_id, key) == list(range(1, EPOCHS + 1)), key
    for key in ("init_act_std_ratio", "init_grad_norm_ratio"):
        assert _steps(mlflow_client, run_id, key) == [0], key
    val = {m.step: m.value for m in mlflow_client.get_metric_history(run_id, "val_accuracy")}
    assert val == {row["epoch"]: row["val_accuracy"] for row in done.result.history}


def test_end_of_trial_metrics_are_logged_once(tanh_trial, mlflow_client):
    _, done = tanh_trial
    metrics = mlflow_client.get_run(done.run_id).data.metrics
    for key in ("final_accuracy", "final_val_accuracy", "best_val_accuracy", "wall_time_s"):
        assert len(mlflow_client.get_metric_history(done.run_id, key)) == 1, key
    assert metrics["final_accuracy"] == pytest.approx(done.result.final_accuracy)
    assert metrics["best_val_accuracy"] == pytest.approx(done.result.best_val_accuracy)
    assert metrics["final_accuracy"] > 0.5  # tanh + layer norm learns digits in two epochs
    assert metrics["wall_time_s"] > 0


def test_saturation_is_logged_for_tanh_and_not_for_relu(tanh_trial, relu_trial, mlflow_client):
    tanh_metrics = mlflow_client.get_run(tanh_trial[1].run_id).data.metrics
    relu_metrics = mlflow_client.get_run(relu_trial[1].run_id).data.metrics
    assert "dead_fraction" in tanh_metrics and "dead_fraction" in relu_metrics
    assert 0.0 <= tanh_metrics["saturated_fraction"] <= 1.0
    assert "saturated_fraction" not in relu_metrics


# --- tags and status --------------------------------------------------------------------------------


def test_finished_run_carries_outcome_and_provenance_tags(tanh_trial, mlflow_client):
    _, done = tanh_trial
    run = mlflow_client.get_run(done.run_id)
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert tags["diverged"] == "false"
    assert tags["pruned"] == "false"
    assert tags["git_commit"]
    assert tags["version.torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert tags["device"] == "cpu" or tags["device"].startswith("cuda")
    assert done.run_id in tags["reproduce"] and tags["reproduce"].startswith("python -m pipeline reproduce")


def test_diverged_trial_is_a_finished_run_tagged_diverged(diverged_trial, mlflow_client):
    _, done = diverged_trial
    assert done.result.diverged
    run = mlflow_client.get_run(done.run_id)
    assert run.info.status == "FINISHED"  # divergence is a result, not a failure
    assert run.data.tags["diverged"] == "true"
    assert run.data.tags["diverged_epoch"] == "1"
    assert "failure_reason" not in run.data.tags
    train_loss = mlflow_client.get_metric_history(done.run_id, "train_loss")
    assert [m.step for m in train_loss] == [1] and not math.isfinite(train_loss[0].value)
    assert run.data.metrics["final_accuracy"] <= 0.2


@pytest.mark.parametrize(
    "raised, status", [(RuntimeError("boom in training"), "FAILED"), (KeyboardInterrupt(), "KILLED")]
)
def test_an_exception_in_training_ends_the_run_never_leaving_it_running(
    tstore, mlflow_client, monkeypatch, raised, status
):
    def explode(prepared, report):
        report(0, {"val_accuracy": 0.1})  # the run is open and being written to
        raise raised

    monkeypatch.setattr("pipeline.record.runner.train_trial", explode)
    experiment = f"exploding-{status.lower()}"
    with pytest.raises(type(raised)):
        run_recorded_trial(_config(tstore, f"tracking.experiment={experiment}"))
    exp = mlflow_client.get_experiment_by_name(experiment)
    runs = mlflow_client.search_runs([exp.experiment_id])
    assert [r.info.status for r in runs] == [status]
    reason = runs[0].data.tags["failure_reason"]
    assert ("RuntimeError: boom in training" in reason) if status == "FAILED" else reason == "interrupted"


# --- artifacts --------------------------------------------------------------------------------------


def test_artifacts_are_config_weights_and_layer_diagnostics(tanh_trial, mlflow_client):
    _, done = tanh_trial
    assert {
        "config.yaml",
        "weights/model.safetensors",
        "diagnostics/layers.csv",
        "diagnostics/signal_by_depth.png",
    } <= _artifacts(mlflow_client, done.run_id)


def test_logged_config_composes_back_to_the_config_that_ran(tanh_trial, mlflow_client, tmp_path):
    config, done = tanh_trial
    local = mlflow_client.download_artifacts(done.run_id, "config.yaml", str(tmp_path))
    logged = yaml.safe_load(open(local).read())
    assert logged == config
    assert config_from_dict(logged).initializer.name == "xavier_uniform"


def test_layer_table_has_one_row_per_hidden_layer_per_diagnosed_epoch(
    tanh_trial, diverged_trial, mlflow_client, tmp_path
):
    for (_, done), epochs in ((tanh_trial, EPOCHS + 1), (diverged_trial, 1)):  # diverged: epoch 0 only
        local = mlflow_client.download_artifacts(done.run_id, "diagnostics/layers.csv", str(tmp_path / done.run_id))
        rows = list(csv.DictReader(open(local)))
        assert len(rows) == DEPTH * epochs
        assert {"act_std", "grad_norm", "weight_grad_norm", "dead_fraction"} <= set(rows[0])
        assert sorted({(r["epoch"], r["layer"]) for r in rows}) == sorted(
            (str(e), str(layer)) for e in range(epochs) for layer in range(1, DEPTH + 1)
        )
        assert all(math.isfinite(float(r["act_std"])) for r in rows)


def test_logged_weights_are_the_final_weights(tanh_trial, mlflow_client, tmp_path):
    config, done = tanh_trial
    local = mlflow_client.download_artifacts(done.run_id, "weights/model.safetensors", str(tmp_path))
    state = load_weights_file(local)
    prepared = prepare_trial(config)  # the same seed, untrained
    fresh = prepared.model.state_dict()
    assert set(state) == set(fresh)
    assert any(not torch.equal(state[k], fresh[k].cpu()) for k in state)  # training moved them
    prepared.model.load_state_dict(state)
    _, test_accuracy = evaluate(prepared.model, prepared.splits.x_test, prepared.splits.y_test)
    assert test_accuracy == pytest.approx(done.result.final_accuracy)  # exactly what was scored


# --- pretrained starts from a run ---------------------------------------------------------------------


def test_pretrained_run_id_starts_from_that_runs_final_weights(tstore, tanh_trial, mlflow_client, tmp_path):
    _, done = tanh_trial
    weights = load_weights_file(download_weights(done.run_id, tstore[0].partition("=")[2]))
    cfg = config_from_dict(
        _config(
            tstore,
            "initializer=pretrained",
            f"initializer.run_id={done.run_id}",
            "activation=tanh",
            "normalization=layer",
        )
    )
    fetch_pretrained(cfg)  # the one route from a run to the engine: the trial's own store
    prepared = prepare_trial(cfg)
    state = prepared.model.state_dict()
    assert set(state) == set(weights)
    for key, value in weights.items():
        assert torch.equal(state[key].cpu(), value), key


def test_pretrained_run_id_of_another_model_shape_is_a_config_error(tstore, tanh_trial):
    _, done = tanh_trial
    config = _config(
        tstore, "initializer=pretrained", f"initializer.run_id={done.run_id}", "normalization=layer", "model.width=16"
    )
    with pytest.raises(ConfigError, match=r"shape mismatch: .*\(16, 64\) vs file \(32, 64\)"):
        run_recorded_trial(config)


def test_pretrained_trial_records_the_run_id_it_started_from(tstore, tanh_trial, mlflow_client, tmp_path):
    _, source = tanh_trial
    config = _config(
        tstore,
        "initializer=pretrained",
        f"initializer.run_id={source.run_id}",
        "activation=tanh",
        "normalization=layer",
        "train.epochs=1",
    )
    done = run_recorded_trial(config)
    run = mlflow_client.get_run(done.run_id)
    assert run.data.params["initializer"] == "pretrained"
    assert run.data.params["initializer.run_id"] == source.run_id
    local = mlflow_client.download_artifacts(done.run_id, "config.yaml", str(tmp_path))
    assert yaml.safe_load(open(local).read())["initializer"]["run_id"] == source.run_id  # reproducible


# --- reproduce ----------------------------------------------------------------------------------------


def test_reproduce_reruns_the_logged_config_with_the_same_curves(tstore, relu_trial, mlflow_client, capsys):
    _, original = relu_trial
    capsys.readouterr()
    assert main(["reproduce", original.run_id, tstore[0]]) == 0
    out = capsys.readouterr().out
    new_id = next(line for line in out.split() if line.startswith("run_id=")).partition("=")[2]
    assert new_id != original.run_id
    new = mlflow_client.get_run(new_id)
    assert new.info.status == "FINISHED"
    assert new.data.tags["reproduced_from"] == original.run_id

    def val_history(run_id):
        return [
            (m.step, m.value)
            for m in sorted(mlflow_client.get_metric_history(run_id, "val_accuracy"), key=lambda m: m.step)
        ]

    assert val_history(new_id) == val_history(original.run_id)
    assert new.data.metrics["final_accuracy"] == mlflow_client.get_run(original.run_id).data.metrics["final_accuracy"]
    assert new.data.params == mlflow_client.get_run(original.run_id).data.params
    assert new.info.experiment_id == mlflow_client.get_run(original.run_id).info.experiment_id
    rows = [line for line in out.splitlines() if line.startswith("| ") and "max abs diff" not in line]
    assert {row.split("|")[1].split()[0] for row in rows} >= {"val_accuracy", "train_loss", "final_accuracy"}
    assert all(row.split("|")[4].strip() == "0" for row in rows)  # CPU: identical, every curve and final


def test_a_batched_trial_reproduces_exactly_in_its_batch(tstore, mlflow_client, capsys):
    """Alone, a batch member's matmuls round differently; re-run with its batch-mates, in their
    order, every curve is the same to the last bit."""
    members = [("xavier_normal", 1.0, 0, "tanh"), ("kaiming_normal", 1.5, 1, "relu"), ("orthogonal", 2.0, 2, "relu")]
    configs = [
        _config(
            tstore,
            f"initializer={i}",
            f"scale={s}",
            f"seed={seed}",
            f"activation={act}",
            "normalization=batch",
            "train.epochs=3",
            "train.threads=1",
            "tracking.experiment=batched",
        )
        for i, s, seed, act in members
    ]
    batch = run_recorded_batch([TrialRequest(config) for config in configs])
    runs = [mlflow_client.get_run(done.run_id) for done in batch]
    assert len({run.data.tags["trial_batch_id"] for run in runs}) == 1
    assert [run.data.tags["trial_batch_index"] for run in runs] == ["0", "1", "2"]
    assert batch_mates(tstore[0].partition("=")[2], batch[1].run_id) == [done.run_id for done in batch]
    capsys.readouterr()
    assert main(["reproduce", batch[1].run_id, tstore[0]]) == 0
    rows = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "max abs diff" not in line
    ]
    assert {row.split("|")[1].split()[0] for row in rows} >= {"val_loss", "train_loss", "final_accuracy"}
    assert all(row.split("|")[4].strip() == "0" for row in rows), rows


def test_a_deleted_key_is_recorded_with_its_default(tstore, mlflow_client, tmp_path):
    config = _config(tstore, "~scale", "train.epochs=1")
    assert "scale" not in config  # Hydra deleted it; the typed config falls back to the default
    done = run_recorded_trial(config)
    assert mlflow_client.get_run(done.run_id).data.params["scale"] == "1.0"
    local = mlflow_client.download_artifacts(done.run_id, "config.yaml", str(tmp_path))
    assert yaml.safe_load(open(local).read())["scale"] == 1.0  # reproduce gets a complete config


def test_buffered_params_tags_and_metrics_reach_the_store_in_as_few_batches_as_mlflow_allows(tstore, mlflow_client):
    tracking_cfg = config_from_dict(_config(tstore)).tracking
    with start_run(tracking_cfg, "batches") as run:
        calls = []
        log_batch = run.client.log_batch
        run.client.log_batch = lambda *a, **kw: (calls.append(kw), log_batch(*a, **kw))
        run.log_params({f"p{i}": str(i) for i in range(250)}, tags={f"t{i}": i for i in range(150)}, buffered=True)
        for step in range(25):
            run.log_metrics(step, {f"m{i}": float(i * step) for i in range(100)}, buffered=True)
        assert calls == []  # nothing written yet: all of it goes with the end of the run
    assert len(calls) == 3  # 250 params at 100 a call; 2,500 metrics at 1,000 entities a call
    assert all(len(c["params"]) <= 100 and len(c["tags"]) <= 100 for c in calls)
    assert all(len(c["params"]) + len(c["tags"]) + len(c["metrics"]) <= 1000 for c in calls)
    data = mlflow_client.get_run(run.run_id).data
    assert len(data.params) == 250 and {f"t{i}" for i in range(150)} <= set(data.tags)
    assert len(mlflow_client.get_metric_history(run.run_id, "m7")) == 25


def test_an_experiment_is_looked_up_once_per_process(tmp_path, monkeypatch):
    from pipeline.config import TrackingConfig

    store = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_root=str(tmp_path / "artifacts"))
    first = ensure_experiment(store, "once")
    assert MlflowClient(store.uri).get_experiment_by_name("once").experiment_id == first

    def no_lookup(*args, **kwargs):
        raise AssertionError("the store was asked again")

    monkeypatch.setattr(record_store, "client", no_lookup)
    assert ensure_experiment(store, "once") == first  # a worker's next trial: no store call
    with pytest.raises(AssertionError):
        ensure_experiment(store, "another")


def _journal_mode(path) -> str:
    import sqlite3

    with contextlib.closing(sqlite3.connect(path)) as connection:
        return connection.execute("PRAGMA journal_mode").fetchone()[0]


def test_a_new_sqlite_store_writes_ahead_and_an_existing_one_keeps_its_journal(tmp_path):
    import sqlite3

    client(f"sqlite:///{tmp_path}/new.db").search_experiments()
    assert _journal_mode(tmp_path / "new.db") == "wal"
    with contextlib.closing(sqlite3.connect(tmp_path / "old.db")) as connection:
        connection.execute("CREATE TABLE earlier (x)")  # a store from before, in the default journal mode
    client(f"sqlite:///{tmp_path}/old.db")
    assert _journal_mode(tmp_path / "old.db") == "delete"


def test_a_cluster_studys_new_sqlite_store_keeps_the_default_journal(tmp_path):
    """Hosts sharing a store over a network filesystem cannot share SQLite's write-ahead log."""
    from pipeline.study.loop import _open_mlflow_store
    from pipeline.study.plan import plan_study

    for address, mode in ((None, "wal"), ("10.0.0.1:6379", "delete")):
        plan = plan_study(
            [
                f"tracking.uri=sqlite:///{tmp_path}/{mode}.db",
                f"study.output_dir={tmp_path}",
                *([f"cluster.address={address}"] if address else []),
            ]
        )
        _open_mlflow_store(plan)
        assert _journal_mode(tmp_path / f"{mode}.db") == mode


@pytest.mark.parametrize(
    "uri, directory",
    [
        ("file:///data/art/1/abc/artifacts", "/data/art/1/abc/artifacts"),
        ("file://localhost/data/my%20runs/artifacts", "/data/my runs/artifacts"),
        ("/data/art/artifacts", "/data/art/artifacts"),
        ("mlflow-artifacts:/1/abc/artifacts", None),  # a server's: uploaded through MLflow
        ("s3://bucket/1/abc/artifacts", None),
        (None, None),
    ],
)
def test_journaled_files_are_written_in_place_only_where_artifacts_are_a_local_directory(uri, directory):
    found = local_directory(uri)
    assert (str(found) if found is not None else None) == directory


def test_an_artifact_read_through_the_runs_artifact_uri_is_the_one_mlflow_downloads(
    tanh_trial, tstore, mlflow_client, tmp_path
):
    """The report opens each run's artifacts from its artifact URI (a local directory: read in
    place), not through MLflow's ``runs:/`` route (the run read twice, logged models looked up)."""
    uri, run_id = tstore[0].partition("=")[2], tanh_trial[1].run_id
    artifact_uri = mlflow_client.get_run(run_id).info.artifact_uri
    direct = download_artifact(uri, run_id, "diagnostics/layers.csv", tmp_path / "a", artifact_uri)
    routed = download_artifact(uri, run_id, "diagnostics/layers.csv", tmp_path / "b")
    assert direct is not None and routed is not None and direct.read_bytes() == routed.read_bytes()
    assert download_artifact(uri, run_id, "no/such.csv", tmp_path / "c", artifact_uri) is None
    assert download_artifact(uri, run_id, "no/such.csv", tmp_path / "d") is None


# --- hostile values --------------------------------------------------------------------------------


def test_a_tag_value_with_a_quote_is_searched_for_as_it_is(tmp_path):
    from pipeline.config import TrackingConfig
    from pipeline.record.runs import find_runs

    tracking = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_root=str(tmp_path / "a"))
    with start_run(tracking, "quotes", tags={"note": "it's"}) as run:
        pass
    with start_run(tracking, "quotes", tags={"note": "its"}):
        pass
    assert find_runs(tracking, "quotes", {"note": "it's"}) == [run.run_id]
    with pytest.raises(ConfigError, match="both kinds of quote"):
        find_runs(tracking, "quotes", {"note": 'it\'s "quoted"'})


def test_a_logged_config_edited_into_unsafe_yaml_is_a_one_line_error(tstore, tanh_trial, capsys):
    from pipeline.record.runs import local_directory

    _, done = tanh_trial
    run = MlflowClient(tstore[0].partition("=")[2]).get_run(done.run_id)
    config = local_directory(run.info.artifact_uri) / "config.yaml"
    original = config.read_text()
    config.write_text("!!python/object/apply:os.system ['echo pwned']\n")
    try:
        assert main(["reproduce", done.run_id, tstore[0]]) == 2
    finally:
        config.write_text(original)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: the config.yaml of run {done.run_id} is not plain YAML")


def test_a_store_another_process_is_still_building_is_waited_for(tmp_path, monkeypatch):
    """MLflow's migrations of a fresh sqlite store race with a second process opening it (an
    `mlflow ui` started with a study): that process sees a half-built schema and must wait."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    record_store.new_store(uri)
    real, failures = MlflowClient, ["No such constraint: 'uq_experiments_name'"] * 2

    def half_built(tracking_uri):
        if failures:
            raise RuntimeError(failures.pop())
        return real(tracking_uri)

    monkeypatch.setattr("mlflow.tracking.MlflowClient", half_built)
    monkeypatch.setattr(record_store, "STORE_BUILD_WAIT_S", 10.0)
    record_store._client.cache_clear()
    assert record_store.client(uri).search_experiments()[0].name == "Default"
    assert failures == []


def test_a_tracking_server_that_fails_is_not_waited_for(monkeypatch):
    calls = []

    def failing(tracking_uri):
        calls.append(tracking_uri)
        raise RuntimeError("500 from the server")

    monkeypatch.setattr("mlflow.tracking.MlflowClient", failing)
    record_store._client.cache_clear()
    with pytest.raises(RuntimeError, match="500"):
        record_store.client("http://127.0.0.1:9")
    assert len(calls) == 1


@pytest.mark.slow
def test_a_fresh_store_opened_by_mlflow_and_a_study_at_once_opens_in_both(tmp_path):
    """The real race, several times at offsets inside MLflow's migration window (half of these
    failed with `No such constraint` or a missing column before the study waited)."""
    import subprocess
    import sys
    import time

    mlflow_side = "import sys; from mlflow.tracking import MlflowClient; MlflowClient(sys.argv[1]).search_experiments()"
    ours = "import sys; from pipeline.record.store import open_store; open_store(sys.argv[1])"
    for attempt, delay in enumerate((0.2, 0.3, 0.4, 0.5, 0.6, 0.8)):
        uri = f"sqlite:///{tmp_path}/race{attempt}.db"
        other = subprocess.Popen([sys.executable, "-c", mlflow_side, uri], stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        study = subprocess.run([sys.executable, "-c", ours, uri], capture_output=True, text=True, timeout=120)
        assert other.wait(timeout=120) == 0, other.stderr.read()[-500:]
        assert study.returncode == 0, study.stderr[-500:]


@pytest.mark.parametrize("bulk", [True, False], ids=["database read", "search"])
def test_runs_with_a_tag_among_values_are_found_in_one_read(tmp_path, monkeypatch, bulk):
    """What a resume uses to find the runs of the trials a dead driver left (pipeline/study/study_run.py)."""
    from pipeline.record import tables
    from pipeline.record.runs import runs_with_tag

    tracking = config_from_dict(
        compose([*TINY, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_root={tmp_path}/a"])
    ).tracking
    made = {}
    for number in range(6):
        run = start_run(tracking, "tagged", tags={"optuna_trial": number})
        made[run.run_id] = (str(number), "RUNNING" if number == 4 else "FINISHED")
        if number != 4:  # trial 4's run is left running
            run.end("FINISHED")
    if not bulk:
        monkeypatch.setattr(tables, "readable", lambda uri: False)  # as for a server: MLflow's search
    found = runs_with_tag(tracking, "tagged", "optuna_trial", {"1", "4", "9"}, since_ms=0)
    assert sorted(found) == sorted((run_id, *made[run_id]) for run_id in made if made[run_id][0] in {"1", "4"})
    assert runs_with_tag(tracking, "no such experiment", "optuna_trial", {"1"}, since_ms=0) == []
