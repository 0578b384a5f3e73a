"""A study is safe against its own storage: one driver at a time, a torn journal repaired, a damaged
one refused in one line, a study whose record is in another store refused; never a RUNNING run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.config import ConfigError
from pipeline.study.lock import LOCK_NAME, StudyLock
from pipeline.study.loop import run_study
from pipeline.study.storage import default_storage, repair_torn_tail

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", autouse=True)
def _ray(local_ray):
    yield


def _args(tmp_path, name: str, *extra: str, store: str = "mlflow.db") -> list[str]:
    return [
        f"study.name={name}", f"study.output_dir={tmp_path}/studies", "study.progress=false",
        f"tracking.uri=sqlite:///{tmp_path}/{store}", f"tracking.artifact_root={tmp_path}/artifacts",
        "cluster.num_cpus=2", "model.depth=2", "model.width=32", "train.epochs=1", "train.probe_size=64",
        "study.report=false", "tracking.log_weights=false", "study.sampler=random", *extra,
    ]  # fmt: skip


def _runs(tmp_path, name: str, store: str = "mlflow.db") -> list:
    client = MlflowClient(f"sqlite:///{tmp_path}/{store}")
    experiment = client.get_experiment_by_name(name)
    return client.search_runs([experiment.experiment_id]) if experiment else []


def test_a_second_driver_is_refused_naming_the_first(tmp_path, capsys):
    with StudyLock(tmp_path / "studies" / "busy", "busy"):
        assert main(["run", *_args(tmp_path, "busy", "study.n_trials=2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: study busy is already running")
    assert f"driver pid {os.getpid()} on " in err[0] and LOCK_NAME in err[0]
    assert _runs(tmp_path, "busy") == []  # nothing recorded, nothing left RUNNING


def test_a_dead_drivers_lock_is_taken_over(tmp_path):
    folder = tmp_path / "studies" / "stale"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from pipeline.study.lock import StudyLock\nwith StudyLock({str(folder)!r}, 's'):\n"
         "    print('held', flush=True)\n    import time; time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ConfigError, match="already running"), StudyLock(folder, "s"):
        pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(10)
    with StudyLock(folder, "s"):  # the kernel released it with its process
        pass


def test_a_journal_cut_mid_record_is_repaired_and_the_study_resumes(tmp_path, capsys):
    run_study(_args(tmp_path, "torn", "study.n_trials=2"))
    journal = default_storage(f"{tmp_path}/studies", "torn")
    whole = open(journal, "rb").read()
    with open(journal, "wb") as handle:
        handle.write(whole[:-25])  # a power loss in the middle of the last record
    done = run_study(_args(tmp_path, "torn", "study.n_trials=3"))
    assert "dropped its last" in capsys.readouterr().err
    assert done.summary["metrics"]["n_complete"] >= 2
    assert not [r for r in _runs(tmp_path, "torn") if r.info.status == "RUNNING"]
    assert repair_torn_tail(journal) == 0  # whole again: every record ends its line


def test_a_journal_damaged_in_the_middle_is_refused_in_one_line(tmp_path, capsys):
    run_study(_args(tmp_path, "damaged", "study.n_trials=1"))
    journal = default_storage(f"{tmp_path}/studies", "damaged")
    lines = open(journal, "rb").read().splitlines(keepends=True)
    lines[1] = b'{"op_code": 5, "worker_id": "x", "trial_id": 0, "par\n'
    open(journal, "wb").write(b"".join(lines))
    parents_before = [r.info.status for r in _runs(tmp_path, "damaged")]
    assert main(["run", *_args(tmp_path, "damaged", "study.n_trials=2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: study.storage={journal} cannot be read")
    assert [r.info.status for r in _runs(tmp_path, "damaged")] == parents_before  # nothing reopened


def test_a_study_recorded_in_another_store_is_refused_not_reported_empty(tmp_path, capsys):
    run_study(_args(tmp_path, "moved", "study.n_trials=2"))
    assert main(["run", *_args(tmp_path, "moved", "study.n_trials=3", store="other.db")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has 2 finished trials in its Optuna storage" in err[0] and "other.db" in err[0]
    other = MlflowClient(f"sqlite:///{tmp_path}/other.db")
    assert other.get_experiment_by_name("moved") is None  # no empty experiment left behind


# "it's" quoted for Hydra's grammar: its quote would break the MLflow filter the study searches with.
@pytest.mark.parametrize("name", ["../../../x", "/abs/x", "a/b", '"it\'s"', ".hidden", ""])
def test_a_study_name_is_a_name_never_a_path(tmp_path, capsys, name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", *_args(tmp_path, "x", f"study.name={name}")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: study.name=") and "is a name, not a path" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no folder, no store, anywhere


def test_a_bad_value_leaves_no_folder_behind(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", *_args(tmp_path, "x", "study.objectives=[nope]")]) == 2
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_cluster_fails_in_seconds(tmp_path, capsys):
    from pipeline.study import cluster

    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"cluster.address=127.0.0.1:1 is unreachable within 5 s"):
        cluster._check_reachable("127.0.0.1:1")
    assert time.monotonic() - start < 10


def test_trials_a_stopped_driver_left_are_not_counted_as_failed():
    import optuna

    from pipeline.study.summary import study_summary

    study = optuna.create_study(direction="maximize")
    left = study.ask({"scale": optuna.distributions.FloatDistribution(0.1, 2)})
    left.set_user_attr("interrupted", True)
    study.tell(left, state=optuna.trial.TrialState.FAIL)
    study.enqueue_trial(left.params)
    rerun = study.ask()
    study.tell(rerun, 0.9)
    summary = study_summary(study, ["val_accuracy"], ["scale"])
    assert summary["metrics"]["n_failed"] == 0 and summary["metrics"]["n_complete"] == 1
    assert "0 failed (1 interrupted by a stopped driver, run again)" in summary["text"]


def test_a_killed_driver_leaves_no_ray_process_behind(tmp_path):
    from pipeline.study.reaper import descendants, process_stat

    driver = subprocess.Popen(
        [sys.executable, "-c", "from pipeline.study import cluster; from pipeline.config import ClusterConfig\n"
         "cluster.start(ClusterConfig(num_cpus=1)); print('up', flush=True)\nimport time; time.sleep(120)"],
        cwd=tmp_path, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert driver.stdout.readline().strip() == "up"
    time.sleep(3)  # the raylet starts its agents
    ray_processes = descendants(driver.pid)
    assert len(ray_processes) >= 4  # GCS, raylet, its agents, the watchdog...
    driver.kill()  # kill -9: no ray.shutdown
    driver.wait(10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        alive = [pid for pid, start in ray_processes.items() if (process_stat(pid) or (0, None))[1] == start]
        if not alive:
            break
        time.sleep(0.5)
    assert not alive, f"left behind: {alive}"


def test_a_database_storage_that_cannot_be_opened_is_one_line_without_its_password(tmp_path, capsys):
    start = time.monotonic()
    storage = "study.storage=postgresql://u:secret@127.0.0.1:1/optuna"
    assert main(["run", *_args(tmp_path, "db", storage, "study.n_trials=1")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: study.storage=postgresql://u:***@127.0.0.1:1/optuna")
    assert "secret" not in err[0]
    assert "needs its database driver (psycopg2-binary" in err[0] or "cannot be opened within 5 s" in err[0]
    assert time.monotonic() - start < 20 and _runs(tmp_path, "db") == []


_LISTENERS = """
import os, ray
from pipeline.config import ClusterConfig
from pipeline.study import cluster
cluster.start(ClusterConfig(num_cpus=1))
ray.get(ray.remote(lambda: 1).options(num_cpus=0.1).remote())  # a worker and its servers are up

def descendants(pid):
    children = open(f"/proc/{pid}/task/{pid}/children").read().split()
    return {pid}.union(*(descendants(int(c)) for c in children))

def sockets(pid):
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return set()
    return {link[8:-1] for link in links if link.startswith("socket:[")}

inodes = set().union(*(sockets(pid) for pid in descendants(os.getpid())))
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    for row in open(table).read().splitlines()[1:]:
        local, state, inode = row.split()[1], row.split()[3], row.split()[9]
        if state == "0A" and inode in inodes:  # LISTEN
            print(local.rsplit(":", 1)[0])
cluster.shutdown()
"""

#: /proc/net/tcp{,6} spell addresses in hex, in the host's byte order: 127.0.0.1, and ::ffff:127.0.0.1.
LOOPBACK_HEX = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def test_a_local_ray_instance_listens_on_the_loopback_address_only():
    """Ray binds to the node's IP, a reachable interface's unless told it is alone: a study's own
    instance must not be reachable from other hosts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ENABLE")}
    done = subprocess.run([sys.executable, "-c", _LISTENERS], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    addresses = set(done.stdout.split())
    assert addresses and addresses <= LOOPBACK_HEX, addresses
