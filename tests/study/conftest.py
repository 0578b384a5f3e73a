"""The two-node stack the slow cluster suites share: a Ray cluster (scripts/ray_cluster.sh) and an
MLflow server (scripts/mlflow_server.sh), started side by side for a module and always stopped.

A module changes how the stack is set up by overriding ``stack_env`` (environment for both
scripts): the team store's suite points the MLflow server at PostgreSQL that way.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv whose ray and mlflow CLIs the scripts use


def free_port(pair: bool = False) -> int:
    """A free port below the ephemeral range and above Ray's worker ports (10002-19999)."""
    for _ in range(200):
        port = random.randint(20000, 32000)
        if all(_port_free(p) for p in ((port, port + 1) if pair else (port,))):
            return port
    raise RuntimeError("no free port")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def run_script(name: str, command: str, env: dict, timeout: int = 180) -> subprocess.CompletedProcess:
    """``bash scripts/<name> <command words>``, captured."""
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / name), *command.split()],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def stack_env() -> dict:
    """Extra environment for the stack's scripts (none: sqlite behind the MLflow server)."""
    return {}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, stack_env):
    """The two-node Ray cluster and the MLflow server, started side by side; always stopped."""
    tmp = tmp_path_factory.mktemp("stack")
    head_port = free_port(pair=True)
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "RAY": str(BIN / "ray"),
        "RAY_HEAD_PORT": str(head_port),
        "RAY_DASHBOARD_PORT": str(free_port()),
        "RAY_HEAD_CPUS": "1",
        "RAY_WORKER_CPUS": "1",
        "RAY_CLUSTER_DIR": str(tmp / "ray-cluster"),
        "RAY_CLUSTER_TMP": f"/tmp/ray-initstudy-test-{head_port}",  # short: Unix socket paths
        "MLFLOW": str(BIN / "mlflow"),
        "MLFLOW_PORT": str(free_port()),
        "MLFLOW_WORKERS": "1",
        "MLFLOW_SERVER_DIR": str(tmp / "mlflow-server"),
        **stack_env,
    }
    t0 = time.time()
    mlflow = subprocess.Popen(
        ["bash", str(ROOT / "scripts/mlflow_server.sh"), "start"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        ray = run_script("ray_cluster.sh", "start", env)
        mlflow_out = mlflow.communicate(timeout=180)[0]
        assert ray.returncode == 0, f"ray_cluster.sh start failed:\n{ray.stdout}\n{ray.stderr}"
        assert mlflow.returncode == 0, f"mlflow_server.sh start failed:\n{mlflow_out}"
        print(f"\n[stack up in {time.time() - t0:.0f} s]\n{ray.stdout}{mlflow_out}")
        cluster_dir = tmp / "ray-cluster"
        yield {
            "env": {**env, **_exports(cluster_dir / "env.sh")},
            "head": (cluster_dir / "head.node_id").read_text().strip(),
            "worker": (cluster_dir / "worker.node_id").read_text().strip(),
            "dashboard": f"http://127.0.0.1:{env['RAY_DASHBOARD_PORT']}",
            "tracking": f"http://127.0.0.1:{env['MLFLOW_PORT']}",
            "project": _project_copy(tmp / "project"),
        }
    finally:
        if mlflow.poll() is None:
            mlflow.kill()
        print(run_script("ray_cluster.sh", "stop", env).stdout, run_script("mlflow_server.sh", "stop", env).stdout)
        shutil.rmtree(env["RAY_CLUSTER_TMP"], ignore_errors=True)


def _exports(path: Path) -> dict:
    """``export K=V`` lines of the cluster's env.sh."""
    lines = [line.removeprefix("export ").split("#")[0].strip() for line in path.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if "=" in line)


def _project_copy(dst: Path) -> Path:
    """What a job needs (the package and conf/): a small, fixed snapshot to upload."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in ("pipeline", "conf"):
        shutil.copytree(ROOT / part, dst / part, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", dst)
    return dst
