"""Studies on a real two-node Ray cluster, recorded by a real MLflow server, submitted as a user would.

The cluster (scripts/ray_cluster.sh: a head and a worker node, one CPU each, token authentication)
and the server (scripts/mlflow_server.sh) are started once for the module and always stopped
(``stack`` in conftest.py). Each
study goes in with ``ray job submit --working-dir <a copy of the project>``, so its driver runs on
the head node and its trials on both nodes, as on two hosts. The node-loss test kills the worker
node's raylet while one of its trials trains: the study must still end with every trial recorded.

Slow (about 3 minutes): ``pytest -m slow tests/test_cluster_multinode.py``. The two fast tests at the
end check the failure messages a cluster user meets first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from pipeline.study.storage import default_storage, open_storage
from tests.study.conftest import BIN, ROOT, run_script

TINY = [
    "model.depth=2",
    "model.width=32",
    "train.probe_size=64",
    "tracking.log_weights=false",
    "study.report=false",
    "study.progress=false",
    "study.n_trials=8",
    "cluster.address=auto",
    "cluster.cpus_per_trial=1",
]
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def _submit(stack: dict, job_id: str, overrides: list[str]) -> None:
    """``ray job submit --no-wait``: the driver runs on the head node, in the uploaded copy."""
    command = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--no-wait",
        "--address",
        stack["dashboard"],
        "--submission-id",
        job_id,
        "--working-dir",
        str(stack["project"]),
        "--",
        "python",
        "-m",
        "pipeline",
        "run",
        *overrides,
    ]
    done = subprocess.run(command, env=stack["env"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"ray job submit failed:\n{done.stdout}\n{done.stderr}"


def _job(stack: dict, job_id: str) -> dict:
    """The jobs REST API (what `ray job status` reads), with the cluster's token."""
    token = os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").read_text().strip()
    request = urllib.request.Request(
        f"{stack['dashboard']}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def _wait_job(stack: dict, job_id: str, timeout_s: float) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        job = _job(stack, job_id)
        if job["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            return job
        time.sleep(2)
    logs = subprocess.run(
        [str(BIN / "ray"), "job", "logs", "--address", stack["dashboard"], job_id],
        env=stack["env"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout_s} s; logs:\n{logs[-5000:]}")


def _runs(stack: dict, study: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(stack["tracking"])
    experiment = client.get_experiment_by_name(study)
    runs = client.search_runs([experiment.experiment_id], max_results=1000) if experiment else []
    parents = [r for r in runs if r.data.tags.get("initstudy.role") == "study"]
    children = [r for r in runs if r.data.tags.get("initstudy.role") == "trial"]
    return parents, children


def _optuna(output_dir: Path, study: str) -> optuna.Study:
    return optuna.load_study(study_name=study, storage=open_storage(default_storage(output_dir, study)))


def _overrides(stack: dict, study: str, output_dir: Path, epochs: int) -> list[str]:
    # The driver runs on the head node, which shares this filesystem: an absolute output_dir we can read.
    return [
        f"study.name={study}",
        f"study.output_dir={output_dir}",
        f"tracking.uri={stack['tracking']}",
        f"train.epochs={epochs}",
        *TINY,
    ]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_study_spreads_over_both_nodes_and_records_to_the_server(stack, tmp_path):
    t0 = time.time()
    # The worker node first unpacks the job's working dir and starts a Python worker (~15-20 s here);
    # trials of ~4 s keep the head busy long enough that it takes some of the eight.
    _submit(stack, "two-nodes", _overrides(stack, "two_nodes", tmp_path, epochs=60))
    job = _wait_job(stack, "two-nodes", timeout_s=240)
    print(f"\n[two_nodes: job {job['status']} in {time.time() - t0:.0f} s]")
    assert job["status"] == "SUCCEEDED", job.get("message")

    parents, children = _runs(stack, "two_nodes")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) >= 8 and not [c for c in children if c.info.status == "RUNNING"]
    per_node = Counter(c.data.tags["ray_node"] for c in children)
    print(f"[two_nodes: trials per node: head {per_node[stack['head']]}, worker {per_node[stack['worker']]}]")
    assert set(per_node) == {stack["head"], stack["worker"]}
    trials = _optuna(tmp_path, "two_nodes").trials
    assert len(trials) == 8 and all(t.state in FINISHED for t in trials)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_study_survives_losing_the_worker_node(stack, tmp_path):
    t0 = time.time()
    _submit(stack, "node-loss", _overrides(stack, "node_loss", tmp_path, epochs=400))
    victim = _running_on(stack, "node_loss", stack["worker"], timeout_s=180)
    seen = time.time() - t0
    killed = run_script("ray_cluster.sh", "stop-worker", stack["env"], timeout=60)
    assert killed.returncode == 0, killed.stderr
    job = _wait_job(stack, "node-loss", timeout_s=300)
    print(
        f"\n[node_loss: worker trial running at {seen:.0f} s, node killed; job {job['status']} in {time.time() - t0:.0f} s]"
    )
    assert job["status"] == "SUCCEEDED", job.get("message")

    trials = _optuna(tmp_path, "node_loss").trials
    assert len(trials) == 8 and all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in trials)
    victim_trial = int(victim.data.tags["optuna_trial"])
    assert trials[victim_trial].state == TrialState.COMPLETE  # retried on the head node

    parents, children = _runs(stack, "node_loss")
    assert parents[0].info.status == "FINISHED"
    assert not [c for c in children if c.info.status == "RUNNING"]
    attempts = {c.info.run_id: c for c in children if int(c.data.tags["optuna_trial"]) == victim_trial}
    dead = attempts.pop(victim.info.run_id)
    assert dead.info.status == "FAILED" and "worker died" in dead.data.tags["failure_reason"]
    assert [(r.info.status, r.data.tags["ray_node"]) for r in attempts.values()] == [("FINISHED", stack["head"])]
    per_node = Counter(c.data.tags["ray_node"] for c in children)
    print(f"[node_loss: runs per node: head {per_node[stack['head']]}, worker {per_node[stack['worker']]}]")


def _running_on(stack: dict, study: str, node_id: str, timeout_s: float):
    """The first child run that trains on ``node_id`` (polled from the MLflow server)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        _, children = _runs(stack, study)
        running = [c for c in children if c.info.status == "RUNNING" and c.data.tags.get("ray_node") == node_id]
        if running:
            return running[0]
        time.sleep(0.5)
    raise AssertionError(f"no trial of {study} ran on node {node_id} within {timeout_s} s")


# Fast: the messages a cluster user meets first.


def test_unreachable_tracking_server_fails_in_seconds_before_ray_starts(tmp_path):
    t0 = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "tracking.uri=http://127.0.0.1:9", f"study.output_dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and time.time() - t0 < 30
    assert done.stderr.startswith("error: tracking.uri=http://127.0.0.1:9 is unreachable")
    assert len(done.stderr.strip().splitlines()) == 1  # one line, nothing from Ray


def test_a_node_that_cannot_see_the_sqlite_store_fails_its_trial_clearly(tmp_path):
    from pipeline.config import ConfigError, TrackingConfig
    from pipeline.record.runs import start_run

    elsewhere = TrackingConfig(uri=f"sqlite:///{tmp_path}/on-the-driver-host/mlflow.db")
    with pytest.raises(ConfigError, match="no such file on host .* MLflow server"):
        start_run(elsewhere, "study", parent_run_id="0" * 32, run_name="trial-0-seed-0")
    assert not (tmp_path / "on-the-driver-host").exists()  # nothing created where it would mislead


def test_a_local_instance_keeps_token_authentication_without_a_warning_at_every_start(tmp_path):
    """Ray warns at every local start that it turned token authentication on: we drop that notice
    (it was on every study's stderr), not the authentication."""
    probe = (
        "from pipeline.study import cluster; from pipeline.config import ClusterConfig; import ray\n"
        "def mode():\n"
        "    from ray._raylet import AuthenticationMode, get_authentication_mode\n"
        "    return 'token' if get_authentication_mode() == AuthenticationMode.TOKEN else 'no token'\n"
        "cluster.start(ClusterConfig(num_cpus=1))\n"
        "print(ray.get(ray.remote(mode).options(num_cpus=0.1).remote())); cluster.shutdown()"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["token"]  # the workers run with token authentication
    assert "Token authentication" not in done.stderr
