"""What runs on a Ray worker for one (trial, seed), and the pruning oracle's decision rule.

Ray calls ``trial_task(payloads)``, a generator: it trains the trials through the runner the
``trial`` command uses (several same-shaped trials train together: pipeline/engine/batched.py), asking
the oracle after each epoch whether to stop. The worker does not import MLflow: the runs are
journals (pipeline/record/journal.py) whose operations it yields as they are flushed, for the driver to
write to the store; the last item is the outcomes, small dicts (no tensors) for the driver to
tell Optuna.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from typing import Optional

from pipeline.config import ConfigError
from pipeline.record import names
from pipeline.record.journal import journal_starter
from pipeline.study import cluster

_DONE = object()


def trial_task(payloads: list[dict]) -> Iterator[dict]:
    """Train (trial, seed) pairs on this worker: together if there are several.

    The driver sends several payloads only when their configs share a ``grouping.batch_key``.
    Yields ``{"journal": [(run key, operations), ...]}`` while they train, then the flushes that
    end the runs with ``"outcomes"``: one dict per payload, in order, the run's outcome or
    ``{"error": reason}`` for a member whose config was refused (its FAILED run is journaled).
    Training runs in a thread so that journals flushed mid-epoch reach the driver at once.
    """
    from pipeline.record.runner import TrialRequest  # PyTorch: imported where trials train, never in the driver

    where = cluster.worker_context()
    configs = [_placed(p["config"], where, p["cpus"]) for p in payloads]
    requests = [
        TrialRequest(config, p["experiment"], p["parent_run_id"], _tags(p, where), _pruning_hook(p), p["run_name"])
        for config, p in zip(configs, payloads)
    ]
    outbox: queue.Queue = queue.Queue()
    done: dict = {}
    trainer = threading.Thread(target=_train, args=(requests, outbox, done), daemon=True)
    trainer.start()
    ending: list = []  # the flushes that end runs: they go with the outcomes, in one item
    while True:
        items = _drain(outbox)
        flushes = [item for item in items if item is not _DONE]
        ending += [(key, ops) for key, ops in flushes if ops[-1][0] == "end"]
        now = [(key, ops) for key, ops in flushes if ops[-1][0] != "end"]
        if now:
            yield {"journal": now}
        if _DONE in items:
            break
    trainer.join()
    if "error" in done:
        yield {"journal": ending}  # the runs' ends, with the reason, before the error itself
        raise done["error"]
    outcomes = [_outcome(result, config, where) for result, config in zip(done["outcomes"], configs)]
    # One item: the driver frees the slot (sends the next task) before it writes these runs' ends.
    yield {"journal": ending, "outcomes": outcomes}


def _train(requests: list, outbox: queue.Queue, done: dict) -> None:
    from pipeline.record.runner import run_recorded_batch

    try:
        done["outcomes"] = run_recorded_batch(requests, journal_starter(lambda key, ops: outbox.put((key, ops))))
    except BaseException as err:  # raised again by the generator, after the journals that ended the runs
        done["error"] = err
    finally:
        outbox.put(_DONE)


def _drain(outbox: queue.Queue) -> list:
    """At least one item (waiting for it), and every other already there."""
    items = [outbox.get()]
    while True:
        try:
            items.append(outbox.get_nowait())
        except queue.Empty:
            return items


def _tags(payload: dict, where: dict) -> dict:
    placement = {
        names.RAY_NODE_TAG: where["node_id"],
        names.RAY_NODE_IP_TAG: where["node_ip"],
        names.PID_TAG: os.getpid(),
    }
    return {**payload["tags"], **placement}


def _outcome(done, config: dict, where: dict) -> dict:
    if isinstance(done, ConfigError):
        return {"error": f"ConfigError: {done}"}
    r = done.result
    return {
        "run_key": done.run_id,
        "summary": r.summary(),
        "diverged": r.diverged,
        "pruned": r.pruned,
        "epochs": config["train"]["epochs"],
        "node_id": where["node_id"],
    }


def warm_up() -> None:
    """Import what a trial needs (torch, the data, the trial runner and its registries' modules),
    so the first trial of a fresh worker process starts at once."""
    from pipeline.engine import data  # noqa: F401
    from pipeline.record import runner  # noqa: F401


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
        from pipeline.study.storage import open_storage

        self.study = self.study or optuna.load_study(
            study_name=self.study_name, storage=open_storage(self.storage), pruner=self.pruner
        )
        trial = optuna.trial.Trial(self.study, trial_id)
        trial.report(value, step)
        if trial.should_prune():
            self.pruned.add(trial_id)
            return True
        return False
