"""Fixtures: configs composed through the same Hydra path the CLI uses, stores under tmp_path."""

from __future__ import annotations

import pytest

from pipeline.config.composition import compose

# A small, fast trial: the shape of every test config unless a test says otherwise.
TINY = ["model.depth=2", "model.width=32", "train.epochs=2", "train.probe_size=64"]


@pytest.fixture
def store(tmp_path) -> list[str]:
    """Overrides that point MLflow at a fresh sqlite store in tmp_path."""
    return [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_root={tmp_path}/artifacts"]


@pytest.fixture
def make_config():
    def make(*overrides: str, tiny: bool = True) -> dict:
        return compose([*(TINY if tiny else []), *overrides])

    return make


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray per test module: its studies reuse it (and its warm worker processes)."""
    import ray

    from pipeline.config import ClusterConfig
    from pipeline.study import cluster

    cluster.start(ClusterConfig(num_cpus=2))
    cluster._started_here = False  # the studies under test must not stop it
    yield
    ray.shutdown()
