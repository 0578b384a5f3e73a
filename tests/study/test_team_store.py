"""A team's store: PostgreSQL (scripts/postgres.sh) behind an MLflow server with two workers and
behind Optuna's RDB storage (docs/cluster.md, "Team deployment").

One PostgreSQL and one two-node stack (conftest.py: the Ray cluster and an MLflow server, here on
PostgreSQL) serve the module: a local study that resumes, a study on the cluster that loses its
worker node, and the one-line errors of a wrong password and of a dead database. Studies get the
Optuna URL without its password and read it from libpq's password file (PGPASSFILE), as the docs
advise, so the password stays out of the record; the test checks that it does.

Slow (about 3 minutes): ``pytest -m slow tests/study/test_team_store.py``. PostgreSQL is Debian's
package: scripts/postgres.sh installs it when it runs as root; without it the module is skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pipeline.study.storage import open_storage
from tests.study.conftest import ROOT, free_port, run_script
from tests.study.test_cluster_multinode import _overrides, _running_on, _runs, _submit, _wait_job

pytestmark = pytest.mark.slow
EPOCHS = 2


@pytest.fixture(scope="module")
def postgres():
    """PostgreSQL on a free loopback port with a generated password; always stopped and removed."""
    # Under /tmp, not pytest's folders: those are private to the user that runs the tests, and as
    # root the server runs as the postgres OS user, which must reach its data directory.
    folder = Path(tempfile.mkdtemp(prefix="initstudy-pg-"))
    folder.chmod(0o755)
    env = {**os.environ, "POSTGRES_DIR": str(folder), "POSTGRES_PORT": str(free_port())}
    env.pop("POSTGRES_PASSWORD", None)
    try:
        t0 = time.time()
        started = run_script("postgres.sh", "start", env, timeout=900)  # may apt-get install it first
        if started.returncode == 3:
            pytest.skip(f"no PostgreSQL here: {started.stderr.strip().splitlines()[-1]}")
        assert started.returncode == 0, f"postgres.sh start failed:\n{started.stdout}\n{started.stderr}"
        print(f"\n[postgres up in {time.time() - t0:.1f} s]\n{started.stdout}")
        mlflow_url, optuna_url = run_script("postgres.sh", "url", env).stdout.split()
        yield {
            "mlflow": mlflow_url,
            "optuna": optuna_url,
            "optuna_bare": run_script("postgres.sh", "url --no-password", env).stdout.split()[1],
            "pgpass": str(folder / "pgpass"),
            "password": (folder / "password").read_text(),
            "port": env["POSTGRES_PORT"],
        }
    finally:
        print(run_script("postgres.sh", "stop", env).stdout)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def stack_env(postgres) -> dict:
    """The stack's MLflow server on PostgreSQL with two workers; the cluster's nodes (and so a job's
    driver) find the password in PGPASSFILE."""
    return {"MLFLOW_BACKEND_STORE_URI": postgres["mlflow"], "MLFLOW_WORKERS": "2", "PGPASSFILE": postgres["pgpass"]}


def _run(overrides: list[str], env: dict, timeout: int = 240) -> subprocess.CompletedProcess:
    """``python -m pipeline run`` as a user types it, on a local Ray of its own."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "run", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _local_env(**extra: str) -> dict:
    # Not the cluster's RAY_ADDRESS: a local study starts its own Ray.
    return {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, **extra}


def _load(postgres: dict, study: str) -> optuna.Study:
    return optuna.load_study(study_name=study, storage=open_storage(postgres["optuna"]))


@pytest.mark.timeout(300)
def test_a_local_study_records_every_trial_in_the_team_store_and_resumes(stack, postgres, tmp_path):
    env = _local_env(PGPASSFILE=postgres["pgpass"])
    common = [
        "study.name=team_local",
        f"study.output_dir={tmp_path}",
        f"tracking.uri={stack['tracking']}",
        "study.sampler=random",
        "cluster.num_cpus=2",
        "model.depth=2",
        "model.width=32",
        f"train.epochs={EPOCHS}",
        "train.probe_size=64",
        "tracking.log_weights=false",
        "study.report=false",
        "study.progress=false",
        "study.writers=2",  # the record written by writer processes, through the team's server
    ]
    # The second run resumes the first, given the URL with its password: none may reach the record.
    for n_trials, storage in ((3, postgres["optuna_bare"]), (5, postgres["optuna"])):
        t0 = time.time()
        done = _run([*common, f"study.n_trials={n_trials}", f"study.storage={storage}"], env)
        print(f"\n[team_local: {n_trials} trials in all, run in {time.time() - t0:.1f} s]")
        assert done.returncode == 0, done.stderr[-3000:]

    trials = _load(postgres, "team_local").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 5
    parents, children = _runs(stack, "team_local")
    assert [p.info.status for p in parents] == ["FINISHED"]
    # One run per trial: the resumed study repeated none of the first three.
    assert sorted(int(c.data.tags["optuna_trial"]) for c in children) == list(range(5))
    assert {c.info.status for c in children} == {"FINISHED"}
    client = MlflowClient(stack["tracking"])
    for child in children:  # whole curves: step 0 is the network as initialized
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_accuracy")]
        assert sorted(steps) == list(range(EPOCHS + 1))
    recorded = [value for run in parents + children for value in (*run.data.params.values(), *run.data.tags.values())]
    assert not [value for value in recorded if postgres["password"] in value]
    config = client.download_artifacts(parents[0].info.run_id, "study_config.yaml", str(tmp_path))
    assert postgres["password"] not in open(config).read()
    # The report reopens the storage from the masked param, the password from PGPASSFILE.
    report = subprocess.run(
        [sys.executable, "-m", "pipeline", "report", "team_local", f"tracking.uri={stack['tracking']}",
         f"study.output_dir={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr[-3000:]
    page = (tmp_path / "team_local" / "report" / "report.html").read_text()
    assert "no Optuna storage found" not in page and postgres["password"] not in page


@pytest.mark.timeout(400)
def test_a_cluster_study_on_the_team_store_survives_losing_the_worker_node(stack, postgres, tmp_path):
    t0 = time.time()
    overrides = [*_overrides(stack, "team_node_loss", tmp_path, epochs=400), f"study.storage={postgres['optuna_bare']}"]
    _submit(stack, "team-node-loss", overrides)
    victim = _running_on(stack, "team_node_loss", stack["worker"], timeout_s=180)
    seen = time.time() - t0
    killed = run_script("ray_cluster.sh", "stop-worker", stack["env"], timeout=60)
    assert killed.returncode == 0, killed.stderr
    job = _wait_job(stack, "team-node-loss", timeout_s=300)
    print(
        f"\n[team_node_loss: worker trial at {seen:.0f} s, node killed; job {job['status']} in {time.time() - t0:.0f} s]"
    )
    assert job["status"] == "SUCCEEDED", job.get("message")

    trials = _load(postgres, "team_node_loss").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 8  # the victim retried on the head
    parents, children = _runs(stack, "team_node_loss")
    assert [p.info.status for p in parents] == ["FINISHED"]
    finished = Counter(int(c.data.tags["optuna_trial"]) for c in children if c.info.status == "FINISHED")
    assert finished == Counter(range(8))  # every trial recorded once
    dead = [c for c in children if c.info.status != "FINISHED"]
    assert victim.info.run_id in {c.info.run_id for c in dead}
    assert all(c.info.status == "FAILED" and "worker died" in c.data.tags["failure_reason"] for c in dead)


@pytest.mark.timeout(180)
def test_a_wrong_password_or_a_dead_database_is_one_line_within_seconds(stack, postgres, tmp_path):
    wrong = postgres["optuna"].replace(f":{postgres['password']}@", ":not-the-password@")
    dead = postgres["optuna"].replace(f":{postgres['port']}/", f":{free_port()}/")
    for storage, why in ((wrong, "password authentication failed"), (dead, "Connection refused")):
        t0 = time.time()
        done = _run(
            [f"study.storage={storage}", f"tracking.uri={stack['tracking']}", f"study.output_dir={tmp_path}"],
            _local_env(),
            timeout=60,
        )
        elapsed = time.time() - t0
        err = done.stderr.strip().splitlines()
        print(f"\n[{elapsed:.1f} s] {err}")
        assert done.returncode == 2 and len(err) == 1 and elapsed < 20
        assert (
            err[0].startswith("error: study.storage=postgresql+psycopg2://initstudy:***@127.0.0.1:") and why in err[0]
        )
        assert postgres["password"] not in err[0] and "not-the-password" not in err[0]

    # The MLflow server on a database that refuses it: one line too, not two minutes of MLflow's retries.
    env = {
        **stack["env"],
        "MLFLOW_BACKEND_STORE_URI": postgres["mlflow"].replace(f":{postgres['password']}@", ":not-the-password@"),
        "MLFLOW_PORT": str(free_port()),
        "MLFLOW_SERVER_DIR": str(tmp_path / "refused"),
    }
    t0 = time.time()
    refused = run_script("mlflow_server.sh", "start", env, timeout=60)
    err = refused.stderr.strip().splitlines()
    assert refused.returncode == 1 and len(err) == 1 and time.time() - t0 < 15
    assert (
        "initstudy:***@" in err[0] and "password authentication failed" in err[0] and "not-the-password" not in err[0]
    )
