"""Faults a long study meets: a worker killed mid-trial, the driver killed mid-study."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pipeline.study.loop import run_study
from pipeline.study.storage import default_storage, open_storage

pytestmark = pytest.mark.timeout(400)
ROOT = Path(__file__).resolve().parents[2]
# Writer processes (study.writers) where a fault meets them; the other studies write in the driver.
WRITERS = "study.writers=2"


def study_args(tmp_path, name, *extra):
    return [
        f"study.name={name}",
        f"study.output_dir={tmp_path}/studies",
        "study.progress=false",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"tracking.artifact_root={tmp_path}/artifacts",
        "cluster.num_cpus=2",
        "model.depth=2",
        "model.width=32",
        "train.probe_size=64",
        "tracking.log_weights=false",
        "study.report=false",
        "study.sampler=random",
        *extra,
    ]


def children(tmp_path, name):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], "tags.`initstudy.role` = 'trial'", max_results=1000)
    return runs


def trials(tmp_path, name):
    return optuna.load_study(study_name=name, storage=open_storage(default_storage(f"{tmp_path}/studies", name))).trials


def kill_first_running_worker(tmp_path, name, killed: list, deadline_s: float = 120) -> None:
    """Wait for a child run to be RUNNING, then SIGKILL the worker process that writes it."""
    end = time.time() + deadline_s
    while time.time() < end and not killed:
        for run in children(tmp_path, name):
            if run.info.status == "RUNNING" and run.data.tags.get("pid"):
                time.sleep(0.2)  # let it train a little (a trial here lasts several seconds)
                os.kill(int(run.data.tags["pid"]), signal.SIGKILL)
                killed.append(run.info.run_id)
                return
        time.sleep(0.3)


def test_killed_worker_is_retried_and_no_run_is_left_running(tmp_path, local_ray):
    killed: list[str] = []
    killer = threading.Thread(target=kill_first_running_worker, args=(tmp_path, "wk", killed), daemon=True)
    killer.start()
    run_study(study_args(tmp_path, "wk", "study.n_trials=3", "train.epochs=600", "study.retries=1", WRITERS))
    killer.join()
    assert killed, "no worker was killed: the test did not test anything"
    states = [t.state for t in trials(tmp_path, "wk")]
    assert len(states) == 3 and all(s == TrialState.COMPLETE for s in states)  # the killed one was retried
    runs = {r.info.run_id: r for r in children(tmp_path, "wk")}
    assert runs[killed[0]].info.status == "FAILED"
    assert "worker died" in runs[killed[0]].data.tags["failure_reason"]
    assert not [r for r in runs.values() if r.info.status == "RUNNING"]
    assert sum(r.info.status == "FINISHED" for r in runs.values()) == 3


def test_killed_worker_without_retries_is_a_failed_trial(tmp_path, local_ray):
    killed: list[str] = []
    killer = threading.Thread(target=kill_first_running_worker, args=(tmp_path, "wk0", killed), daemon=True)
    killer.start()
    run_study(
        study_args(
            tmp_path, "wk0", "study.n_trials=3", "train.epochs=600", "study.retries=0", "study.max_failure_rate=1.0"
        )
    )
    killer.join()
    assert killed
    killed_run = next(r for r in children(tmp_path, "wk0") if r.info.run_id == killed[0])
    assert killed_run.info.status == "FAILED", "the worker was killed after its trial had finished"
    found = trials(tmp_path, "wk0")
    assert len(found) == 3 and sum(t.state == TrialState.FAIL for t in found) == 1
    assert "worker died" in next(t for t in found if t.state == TrialState.FAIL).user_attrs["failure_reason"]
    assert not [r for r in children(tmp_path, "wk0") if r.info.status == "RUNNING"]


@pytest.mark.slow
def test_killed_driver_then_same_command_resumes_without_loss(tmp_path):
    command = [
        sys.executable,
        "-m",
        "pipeline",
        "run",
        *study_args(tmp_path, "dk", "study.n_trials=5", "train.epochs=100", WRITERS),
    ]
    driver = subprocess.Popen(
        command, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_for(lambda: sum(t.state == TrialState.COMPLETE for t in trials(tmp_path, "dk")) >= 1, 180)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
        driver.wait()
    before = {t.number: t for t in trials(tmp_path, "dk") if t.state == TrialState.COMPLETE}
    subprocess.run(command, cwd=ROOT, check=True, timeout=300, stdout=subprocess.DEVNULL)
    after = trials(tmp_path, "dk")
    counted = [t for t in after if t.state == TrialState.COMPLETE]
    assert len(counted) == 5  # the target reached, nothing completed lost...
    assert all(after[n].params == t.params and after[n].value == t.value for n, t in before.items())  # ...or redone
    interrupted = [t for t in after if t.user_attrs.get("interrupted")]
    assert all(t.state == TrialState.FAIL for t in interrupted)
    rerun = [t.params for t in counted if t.number > max(before)]
    assert all(t.params in rerun for t in interrupted)  # what was running is run again
    runs = children(tmp_path, "dk")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    left = [r for r in runs if int(r.data.tags["optuna_trial"]) in {t.number for t in interrupted}]
    assert all(r.info.status == "FAILED" and r.data.tags["optuna_state"] == "FAIL" for r in left)
    parents = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_runs(
        [MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_experiment_by_name("dk").experiment_id],
        "tags.`initstudy.role` = 'study'",
    )
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"


def _wait_for(condition, timeout_s: float) -> None:
    end = time.time() + timeout_s
    while time.time() < end:
        try:
            if condition():
                return
        except Exception:  # the stores may not exist yet
            pass
        time.sleep(0.5)
    raise AssertionError("condition not met in time")


def test_a_running_trials_curve_reaches_the_store_while_it_trains(tmp_path, local_ray):
    """Workers stream their journals: a long trial's curve is in MLflow before the trial ends."""
    seen: list = []

    def watch():
        client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        end = time.time() + 120
        while time.time() < end and not seen:
            for run in children(tmp_path, "live"):
                points = (
                    client.get_metric_history(run.info.run_id, "val_accuracy") if run.info.status == "RUNNING" else []
                )
                if len(points) >= 2:
                    seen.append((run.info.run_id, len(points)))
            time.sleep(0.3)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    run_study(study_args(tmp_path, "live", "study.n_trials=1", "train.epochs=1500", WRITERS))  # ~10 s
    watcher.join()
    assert seen, "no curve was seen in the store while its trial ran"
    run_id, points_while_running = seen[0]
    finished = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(run_id, "val_accuracy")
    assert points_while_running < len(finished) == 1501


@pytest.mark.slow
def test_a_terminated_driver_stops_as_on_ctrl_c_leaving_its_record_whole(tmp_path):
    """SIGTERM (kill, ray job stop, a batch system's limit) ends the study as Ctrl-C does; a trial
    whose runs were written is told to Optuna on the way out, not thrown away."""
    args = study_args(tmp_path, "term", "study.n_trials=400", "train.epochs=3", "model.width=8", "study.writers=2")
    command = [sys.executable, "-m", "pipeline", "run", *args]
    driver = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: sum(t.state == TrialState.COMPLETE for t in trials(tmp_path, "term")) >= 20, 240)
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(120) == 130, driver.stderr.read()[-2000:]
    finally:
        driver.kill()
    runs = children(tmp_path, "term")
    assert runs and not [r for r in runs if r.info.status == "RUNNING"]
    complete = {t.number for t in trials(tmp_path, "term") if t.state == TrialState.COMPLETE}
    finished = {int(r.data.tags["optuna_trial"]) for r in runs if r.info.status == "FINISHED"}
    assert finished <= complete  # no trial trained, recorded and then forgotten
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = client.search_runs(
        [client.get_experiment_by_name("term").experiment_id], "tags.`initstudy.role` = 'study'"
    )
    assert [p.info.status for p in parent] == ["KILLED"]


def test_a_signal_during_a_loop_step_is_noted_for_the_step_to_end_and_a_second_is_raised():
    """Raised mid-step, a Ctrl-C could leave a trial recorded but never told (pipeline/study/loop.py)."""
    from pipeline.study.loop import _interrupts_between_steps

    before = signal.getsignal(signal.SIGINT)
    with _interrupts_between_steps() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # the step goes on
        assert stop == [signal.SIGINT]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the user insists
            time.sleep(0.2)
    assert signal.getsignal(signal.SIGINT) is before
