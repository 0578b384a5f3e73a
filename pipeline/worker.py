"""What runs on a Ray worker for one (trial, seed), and the pruning oracle's decision rule.

Ray calls ``trial_task(payload)``; it trains and records the trial through the same
``run_recorded_trial`` the ``trial`` command uses, asking the oracle after each epoch whether to
stop. It returns a small dict (no tensors) for the driver to tell Optuna.
"""
from __future__ import annotations

import os
from typing import Optional

from pipeline import cluster
from pipeline.runner import run_recorded_trial


def trial_task(payload: dict) -> dict:
    """Train and record one seed of one Optuna trial on this worker."""
    where = cluster.worker_context()
    config = _placed(payload["config"], where, payload["cpus"])
    tags = {**payload["tags"], "ray_node": where["node_id"], "ray_node_ip": where["node_ip"], "pid": os.getpid()}
    on_epoch = _pruning_hook(payload) if payload.get("oracle") is not None else None
    done = run_recorded_trial(
        config, payload["experiment"], payload["parent_run_id"], tags, on_epoch, payload["run_name"], record_failures=True
    )
    r = done.result
    return {
        "run_id": done.run_id,
        "summary": r.summary(),
        "diverged": r.diverged,
        "pruned": r.pruned,
        "epochs": config["train"]["epochs"],
        "node_id": where["node_id"],
    }


def warm_up() -> None:
    """Import what a trial needs, so the first trial of a fresh worker process starts at once."""
    import mlflow.tracking  # noqa: F401
    import sklearn.datasets  # noqa: F401
    import torch  # noqa: F401

    from pipeline import data  # noqa: F401


def _placed(config: dict, where: dict, cpus: float) -> dict:
    """The trial uses the GPU Ray gave it (Ray sets CUDA_VISIBLE_DEVICES), else the CPU."""
    train = dict(config["train"])
    if train["device"] == "auto":
        train["device"] = "cuda" if where["gpu_ids"] else "cpu"
    train["threads"] = train["threads"] or max(1, int(cpus))
    return {**config, "train": train}


def _pruning_hook(payload: dict):
    oracle, trial_id, seed_index = payload["oracle"], payload["trial_id"], payload["seed_index"]

    def on_epoch(step: int, metrics: dict) -> Optional[bool]:
        if step == 0 or "val_accuracy" not in metrics:
            return False
        return cluster.ask_oracle(oracle, trial_id, seed_index, step, metrics["val_accuracy"])

    return on_epoch


class PruneDecider:
    """Runs inside the oracle actor: reports seed 0's curve to Optuna and asks its pruner.

    Once a trial is pruned, every other seed of it is told to stop at its next epoch too.
    """

    def __init__(self, storage: str, study_name: str, pruner) -> None:
        self.storage, self.study_name, self.pruner = storage, study_name, pruner
        self.study = None
        self.pruned: set[int] = set()

    def __call__(self, trial_id: int, seed_index: int, step: int, value: float) -> bool:
        import optuna

        if trial_id in self.pruned:
            return True
        if seed_index != 0:
            return False
        self.study = self.study or optuna.load_study(
            study_name=self.study_name, storage=self.storage, pruner=self.pruner
        )
        trial = optuna.trial.Trial(self.study, trial_id)
        trial.report(value, step)
        if trial.should_prune():
            self.pruned.add(trial_id)
            return True
        return False
