"""What runs on a Ray worker for one (trial, seed), and the pruning oracle's decision rule.

Ray calls ``trial_task(payloads)``; it trains and records the trials through the runner the
``trial`` command uses (several same-shaped trials train together: pipeline/batched.py), asking
the oracle after each epoch whether to stop. It returns small dicts (no tensors) for the driver
to tell Optuna.
"""
from __future__ import annotations

import os
from typing import Optional

from pipeline import cluster
from pipeline.errors import ConfigError
from pipeline.runner import TrialRequest, run_recorded_batch


def trial_task(payloads: list[dict]) -> list[dict]:
    """Train and record (trial, seed) pairs on this worker: together if there are several.

    The driver sends several payloads only when their configs share a ``batched.batch_key``. One
    dict per payload comes back, in order: the run's outcome, or ``{"error": reason}`` for a
    member whose config was refused (its FAILED run is recorded).
    """
    where = cluster.worker_context()
    configs = [_placed(p["config"], where, p["cpus"]) for p in payloads]
    requests = [TrialRequest(config, p["experiment"], p["parent_run_id"], _tags(p, where), _pruning_hook(p), p["run_name"])
                for config, p in zip(configs, payloads)]
    outcomes = run_recorded_batch(requests)
    return [_outcome(done, config, where) for done, config in zip(outcomes, configs)]


def _tags(payload: dict, where: dict) -> dict:
    return {**payload["tags"], "ray_node": where["node_id"], "ray_node_ip": where["node_ip"], "pid": os.getpid()}


def _outcome(done, config: dict, where: dict) -> dict:
    if isinstance(done, ConfigError):
        return {"error": f"ConfigError: {done}"}
    r = done.result
    return {"run_id": done.run_id, "summary": r.summary(), "diverged": r.diverged, "pruned": r.pruned,
            "epochs": config["train"]["epochs"], "node_id": where["node_id"], "attempt": where["attempt"]}


def warm_up(tracking_cfg: Optional[dict] = None, experiment: Optional[str] = None) -> None:
    """Import what a trial needs, so the first trial of a fresh worker process starts at once;
    with ``tracking_cfg``, open the study's MLflow store too (engine and schema check: ~1 s)."""
    import mlflow.tracking  # noqa: F401
    import torch  # noqa: F401

    from pipeline import data, tracking  # noqa: F401
    from pipeline.config import TrackingConfig

    if tracking_cfg is not None and experiment is not None:
        tracking.ensure_experiment(TrackingConfig(**tracking_cfg), experiment)


def _placed(config: dict, where: dict, cpus: float) -> dict:
    """The trial uses the GPU Ray gave it (Ray sets CUDA_VISIBLE_DEVICES), else the CPU."""
    train = dict(config["train"])
    if train["device"] == "auto":
        train["device"] = "cuda" if where["gpu_ids"] else "cpu"
    train["threads"] = train["threads"] or max(1, int(cpus))
    return {**config, "train": train}


def _pruning_hook(payload: dict):
    if payload.get("oracle") is None:
        return None
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
        from pipeline.plan import open_storage

        self.study = self.study or optuna.load_study(
            study_name=self.study_name, storage=open_storage(self.storage), pruner=self.pruner
        )
        trial = optuna.trial.Trial(self.study, trial_id)
        trial.report(value, step)
        if trial.should_prune():
            self.pruned.add(trial_id)
            return True
        return False
