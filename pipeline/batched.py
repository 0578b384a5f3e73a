"""Trial batching: trials that share an architecture and batch size train together.

``batch_key(config)`` groups trial configs: two trials with the same key differ only in what each
member keeps for itself (initializer, scale, seed; its run name and tags), so they can train as one
``StackedMLP`` (pipeline/nn/stacked.py). ``train_batch`` then trains the members in lockstep: one
vectorized forward/backward/step per batch for all of them, each member drawing its own shuffled
batches from its own seed, exactly as ``train.train_trial`` would. After each epoch every member's
slice is copied back into its own model, where validation, diagnostics and the epoch's report run
through the same code as an unbatched trial; a member that diverges or is pruned stops there
(its slice keeps computing, unread, until the batch ends).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from pipeline import data, diagnostics
from pipeline.nn.stacked import StackedMLP
from pipeline.optim import build_optimizer
from pipeline.train import PreparedTrial, Report, TrainState, TrialResult, close_epoch, epoch_zero, finish_trial, probe_samples

#: Optimizers whose update of each element depends only on that element's own history, so a sum
#: of the members' losses gives each member its own update (LARS's per-tensor norms would mix them).
ELEMENTWISE_OPTIMIZERS = ("sgd", "adam")

#: What each member of a batch keeps for itself; everything else must be equal.
_OWN_KEYS = ("initializer", "scale", "seed", "tracking", "study", "space", "cluster")


def batch_key(config: dict) -> Optional[str]:
    """A key shared by the trials that can train together with this one; None: it trains alone."""
    if not _batchable(config):
        return None
    shared = {key: value for key, value in config.items() if key not in _OWN_KEYS}
    return json.dumps(shared, sort_keys=True, default=str)


def _batchable(config: dict) -> bool:
    return (
        config["model"]["name"] == "mlp"
        and config["optimizer"]["name"] in ELEMENTWISE_OPTIMIZERS
        and config["train"].get("grad_clip") is None  # a global norm per member: not element-wise
    )


@dataclass
class _Member:
    """One trial of the batch: its own model (synced each epoch), shuffle, state and report."""

    prep: PreparedTrial
    report: Report
    shuffle: torch.Generator
    state: TrainState = field(default_factory=TrainState)
    pruned: bool = False
    result: Optional[TrialResult] = None

    @property
    def running(self) -> bool:
        return self.result is None

    def begin(self, probe_batch) -> None:
        metrics = epoch_zero(self.prep.model, self.prep.splits, probe_batch, self.prep.cfg, self.state)
        self.pruned = bool(self.report(0, metrics))

    def close(self, epoch: int, fit: tuple[float, float], before: list, steps: int, probe_batch) -> None:
        p = self.prep
        metrics = close_epoch(p.model, p.splits, p.cfg, epoch, probe_batch, self.state, fit, before, steps)
        self.pruned = bool(self.report(epoch, metrics))

    def finish_if_stopped(self, epochs: int, start: float) -> None:
        stopped = self.pruned or self.state.diverged_epoch is not None or self.state.epochs_run >= epochs
        if self.running and stopped:
            self.result = finish_trial(self.prep.model, self.prep.splits, self.state, self.pruned, start)


def train_batch(preps: list[PreparedTrial], reports: Optional[list[Optional[Report]]] = None) -> list[TrialResult]:
    """Train same-key prepared trials together; one ``TrialResult`` per member, in order."""
    start = time.perf_counter()
    cfg, splits = preps[0].cfg, preps[0].splits
    reports = reports or [None] * len(preps)
    members = [_Member(p, r or (lambda step, metrics: None), torch.Generator().manual_seed(p.cfg.seed + 1))
               for p, r in zip(preps, reports)]
    models = [p.model for p in preps]
    stacked = StackedMLP(models)
    optimizer = build_optimizer(stacked.parameters(), cfg.optimizer)
    probe_batch = probe_samples(splits, cfg.train.probe_size)
    for member in members:
        member.begin(probe_batch)
        member.finish_if_stopped(cfg.train.epochs, start)
    for epoch in range(1, cfg.train.epochs + 1):
        active = [k for k, m in enumerate(members) if m.running]
        if not active:
            break
        before = {k: diagnostics.weight_snapshot(models[k]) for k in active}
        batches = [data.batch_indices(len(splits.y_train), cfg.batch_size, m.shuffle, splits.y_train.device) for m in members]
        losses, accuracies = _fit_stacked(stacked, optimizer, splits, batches)
        stacked.write_back(models, active)
        for k in active:
            members[k].close(epoch, (losses[k], accuracies[k]), before[k], len(batches[k]), probe_batch)
            members[k].finish_if_stopped(cfg.train.epochs, start)
    return [m.result for m in members]


def _fit_stacked(stacked: StackedMLP, optimizer, splits: data.Splits, batches: list[list]) -> tuple[list, list]:
    """One epoch for every member: step s trains member k on its own s-th batch."""
    stacked.train()
    device = splits.y_train.device
    loss_sum = torch.zeros(stacked.size, device=device)
    correct = torch.zeros(stacked.size, device=device)
    for step in zip(*batches):
        idx = torch.stack(step)  # (K, B): every member's batch has the same size at each step
        x, y = splits.x_train[idx], splits.y_train[idx]
        logits = stacked(x)
        losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(idx.shape).mean(dim=1)
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()  # d(sum)/d(loss_k) = 1: each member gets its own mean-loss gradient
        optimizer.step()
        loss_sum += losses.detach() * idx.shape[1]
        correct += (logits.argmax(dim=2) == y).sum(dim=1)
    n = len(splits.y_train)
    return (loss_sum / n).tolist(), (correct / n).tolist()
