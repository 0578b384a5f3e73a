"""The report of a large study: bulk reads (a fixed number of store round trips whatever the number
of runs), curves and per-layer tables from a bounded sample that the figures name, every run's
final value in the aggregate figures and tables, importances over a bounded draw of trials.

The studies here are written straight into a sqlite store with MLflow's client, in the record's
names (a parent run, a trial run per trial with the axes, curves, final accuracy, epoch 0's
metrics and a layers.csv), so that tens of runs cost no training.
"""

from __future__ import annotations

import html
import re
import tempfile
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from sqlalchemy import event
from sqlalchemy.engine import Engine

from pipeline.record import names, readback, tables
from pipeline.report import build
from pipeline.report.build import HTML_FILE, build_report, choose_sample, wanted

INITIALIZERS = ("kaiming_normal", "xavier_normal", "orthogonal")
ACTIVATIONS = ("relu", "tanh")
LAYERS_CSV = "epoch,layer,act_std,grad_norm,dead_fraction\n0,1,0.5,0.1,0.0\n0,2,0.4,0.05,0.1\n2,1,0.6,0.2,0.0\n"


def _write_study(root: Path, study: str, n_trials: int) -> str:
    """A study of ``n_trials`` one-seed trials in the sqlite store under ``root``; its tracking URI."""
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment(study, artifact_location=(root / "artifacts").as_uri())
    parent = client.create_run(experiment, tags={names.ROLE_TAG: names.STUDY_ROLE}, run_name=f"study-{study}")
    client.log_batch(parent.info.run_id, params=[Param("space.scale", "tag(log, interval(0.25, 4))")])
    layers = root / "layers.csv"
    layers.write_text(LAYERS_CSV)
    for trial in range(n_trials):
        _write_trial(client, experiment, parent.info.run_id, trial, layers)
    client.set_terminated(parent.info.run_id)
    return uri


def _write_trial(client: MlflowClient, experiment: str, parent_id: str, trial: int, layers: Path) -> None:
    tags = {
        names.ROLE_TAG: names.TRIAL_ROLE,
        names.PARENT_RUN_TAG: parent_id,
        names.OPTUNA_TRIAL_TAG: str(trial),
        names.SEED_TAG: "0",
        names.OPTUNA_STATE_TAG: "COMPLETE",
        names.DIVERGED_TAG: "false",
    }
    run = client.create_run(experiment, tags=tags, run_name=f"trial-{trial}-seed-0")
    axes = {
        "initializer": INITIALIZERS[trial % 3],
        "scale": str(0.5 + 0.1 * trial),
        "activation": ACTIVATIONS[trial % 2],
        "normalization": "none",
        "batch_size": "64",
        "optimizer.lr": "0.1",  # not an axis: not read
    }
    final = 0.5 + trial / 1000
    curves = [Metric(k, v + e / 10, 0, e) for e in range(3) for k, v in (("val_accuracy", 0.2), ("val_loss", 2.0))]
    at_init = [Metric("init_grad_norm_ratio", 1.5, 0, 0), Metric("final_accuracy", final, 0, 2)]
    params = [Param(k, v) for k, v in axes.items()]
    client.log_batch(run.info.run_id, metrics=curves + at_init, params=params)
    client.log_artifact(run.info.run_id, str(layers), "diagnostics")
    client.set_terminated(run.info.run_id)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two studies in one store: "small" (12 trials) and "large" (36 trials)."""
    root = tmp_path_factory.mktemp("large")
    uri = _write_study(root, "small", 12)
    _write_study(root, "large", 36)
    return root, uri


def _report(root: Path, uri: str, study: str, sample_size: int) -> list[str]:
    """The SQL statements one report of ``study`` sends to the store."""
    seen: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany):
        seen.append(statement)

    event.listen(Engine, "before_cursor_execute", count)
    try:
        build_report(study, uri, str(root / "studies"), log_to_run=False, sample_size=sample_size)
    finally:
        event.remove(Engine, "before_cursor_execute", count)
    return seen


def test_the_store_round_trips_of_a_report_do_not_grow_with_its_runs(stores):
    root, uri = stores
    _report(root, uri, "small", sample_size=6)  # this process's first report: the client's own start-up
    small = _report(root, uri, "small", sample_size=6)
    large = _report(root, uri, "large", sample_size=6)
    assert len(large) == len(small) and 0 < len(small) < 40, (len(small), len(large))


def test_a_report_past_its_sample_bound_names_the_sample_and_still_reads_every_final_value(stores):
    root, uri = stores
    build_report("large", uri, str(root / "studies"), log_to_run=False, sample_size=6)
    page = html.unescape((root / "studies" / "large" / "report" / HTML_FILE).read_text())
    # 6 drawn, plus runs of any initializer or activation left with fewer than SAMPLE_PER_VALUE
    note = re.search(r"the curves and per-layer tables of (\d+) of the study's 36 runs, chosen by a hash", page)
    assert note and 6 <= int(note.group(1)) < 36
    for title in ("Convergence by initializer", "Signal propagation at initialization", "Dead and saturated units"):
        figure = re.search(rf"<figure id='\w+'><h3>{re.escape(title)}</h3>.*?</figure>", page)
        assert figure and "Drawn from a sample" in figure.group(0), title
    heatmap = re.search(r"<figure id='final_accuracy_heatmap'>.*?</figure>", page).group(0)
    assert "Drawn from a sample" not in heatmap  # an aggregate figure: every run
    finals = re.findall(r"<td>(0\.5\d{3}) ± 0\.0000</td>", page)  # the trials table: every trial's final accuracy
    assert sorted(finals) == [f"{0.5 + t / 1000:.4f}" for t in range(36)]
    assert "<p>36 trials, 36 runs" in page


def test_a_report_within_its_sample_bound_reads_every_run_and_says_nothing_of_a_sample(stores):
    root, uri = stores
    build_report("small", uri, str(root / "studies"), log_to_run=False)
    page = (root / "studies" / "small" / "report" / HTML_FILE).read_text()
    assert "Drawn from a sample" not in page
    for title in ("Convergence by initializer", "Signal propagation at initialization", "Dead and saturated units"):
        assert f"<img alt='{title}'" in page, title


def test_bulk_reads_equal_the_clients_records(stores, monkeypatch):
    """The database store's bulk read and the client's search give the same records, and
    ``many_histories`` the same curves as a read per run."""
    _, uri = stores
    parent = readback.study_parent(uri, "small")
    keep = wanted(["scale"])
    bulk = sorted(readback.trial_runs(uri, parent, keep), key=lambda r: r.run_id)
    curves = readback.many_histories(uri, [r.run_id for r in bulk], build.CURVES)
    monkeypatch.setattr(tables, "readable", lambda uri: False)
    searched = sorted(readback.trial_runs(uri, parent, keep), key=lambda r: r.run_id)
    assert bulk == searched and len(bulk) == 12
    assert set(bulk[0].params) == {"initializer", "scale", "activation", "normalization", "batch_size"}
    assert bulk[0].metrics.keys() == {"final_accuracy", "init_grad_norm_ratio"}
    assert curves == readback.many_histories(uri, [r.run_id for r in bulk], build.CURVES)  # now one read per run
    assert curves[bulk[0].run_id]["val_accuracy"] == [(0, 0.2), (1, 0.30000000000000004), (2, 0.4)]


def _records(counts: dict[str, int]) -> list[readback.RunRecord]:
    made = []
    for initializer, n in counts.items():
        for i in range(n):
            params = {"initializer": initializer, "activation": "relu"}
            made.append(readback.RunRecord(f"{initializer}-{i}", "", "FINISHED", params, {}, {"val_accuracy": 0.5}))
    return made


def test_the_sample_is_fixed_bounded_and_keeps_some_runs_of_every_value():
    records = _records({"common": 500, "rare": 3})
    sample = choose_sample(records, bound=20)
    assert sample == choose_sample(list(reversed(records)), bound=20)  # a fixed draw, whatever the order
    chosen = {r.run_id: r for r in records if r.run_id in set(sample.run_ids)}
    assert 20 <= len(chosen) <= 20 + build.SAMPLE_PER_VALUE and sample.out_of == 503
    assert sum(r.params["initializer"] == "rare" for r in chosen.values()) == 3
    assert f"{len(chosen)} of the study's 503 runs" in sample.note()
    assert choose_sample(records, bound=1000).note() == ""


def test_importances_weigh_a_fixed_draw_of_a_large_studys_trials():
    from pipeline.report.importances import inputs, weighed

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("scale", 0.1, 10) + (t.suggest_categorical("a", ["x", "y"]) == "y"), 40)
    payload = inputs(study, max_trials=15)
    assert len(payload["trials"]) == 15 and payload["params"] == ["a", "scale"]
    assert [t.number for t in payload["trials"]] == [t.number for t in weighed(study.trials, 15)]  # the same draw
    assert len(inputs(study)["trials"]) == 40


def test_the_optimization_history_of_many_trials_draws_in_linear_time():
    from pipeline.report.figures import plot_optimization_history, plt

    complete = SimpleNamespace(name="COMPLETE")
    trials = [SimpleNamespace(number=i, state=complete, values=[(i * 7919 % 50_000) / 50_000]) for i in range(50_000)]
    with tempfile.TemporaryDirectory() as tmp:
        fig = plot_optimization_history(trials, "val_accuracy", "maximize")
        best = list(fig.axes[0].lines[0].get_ydata())
        fig.savefig(Path(tmp, "h.png"))
        plt.close(fig)
    assert best[-1] == max(t.values[0] for t in trials) and best == sorted(best)
