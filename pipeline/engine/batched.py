"""Trial batching: trials that share an architecture and batch size train together.

``grouping.batch_key(config)`` groups trial configs (pipeline/study/grouping.py: the driver's side, no
PyTorch): two trials with the same key differ only in what each member keeps for itself
(initializer, scale, seed, activation; its run name and tags), so they can train as one
``StackedMLP`` (pipeline/engine/nn/stacked.py). ``train_batch`` then trains the members in
lockstep: one vectorized forward/backward/step per batch for all of them, each member drawing its
own shuffled batches from its own seed, exactly as ``train.train_trial`` would. Validation, update
ratios and the diagnostics probe are vectorized too; each member's numbers then go through the same
epoch bookkeeping and report as an unbatched trial's. A member that diverges or is pruned stops
there: its slice is copied back into its own model (for its final accuracy and weights) and keeps
computing, unread, until the batch ends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from pipeline.config.catalog import ACTIVATIONS
from pipeline.engine import data, diagnostics
from pipeline.engine.nn.stacked import StackedMLP, act_key
from pipeline.engine.optim import build_optimizer
from pipeline.engine.train import (
    EpochMeasures,
    PreparedTrial,
    Report,
    TrainState,
    TrialResult,
    close_epoch,
    epoch_zero,
    finish_trial,
    probe_due,
    probe_samples,
)


@dataclass
class _Member:
    """One trial of the batch: its own model (written back when it stops), shuffle, state, report."""

    prep: PreparedTrial
    report: Report
    shuffle: torch.Generator
    state: TrainState = field(default_factory=TrainState)
    pruned: bool = False
    result: Optional[TrialResult] = None

    @property
    def running(self) -> bool:
        return self.result is None

    def begin(self, measures: EpochMeasures) -> None:
        self.pruned = bool(self.report(0, epoch_zero(self.state, lambda: measures, self.prep.at_init)))

    def close(self, epoch: int, fit: tuple[float, float], measures: EpochMeasures) -> None:
        self.pruned = bool(self.report(epoch, close_epoch(self.prep.cfg, epoch, self.state, fit, lambda: measures)))

    def stopped(self, epochs: int) -> bool:
        return self.pruned or self.state.diverged_epoch is not None or self.state.epochs_run >= epochs

    def finish(self, start: float) -> None:
        self.result = finish_trial(self.prep.model, self.prep.splits, self.state, self.pruned, start)


def train_batch(preps: list[PreparedTrial], reports: Optional[list[Optional[Report]]] = None) -> list[TrialResult]:
    """Train same-key prepared trials together; one ``TrialResult`` per member, in order."""
    reports = reports or [None] * len(preps)
    # Members with the same activation side by side: one activation call per run (nn/stacked.py).
    order = sorted(range(len(preps)), key=lambda k: act_key(preps[k].model.blocks[0].act))
    results = _train_ordered([preps[k] for k in order], [reports[k] for k in order])
    by_member = dict(zip(order, results))
    return [by_member[k] for k in range(len(preps))]


def _train_ordered(preps: list[PreparedTrial], reports: list[Optional[Report]]) -> list[TrialResult]:
    start = time.perf_counter()
    cfg, splits = preps[0].cfg, preps[0].splits
    members = [
        _Member(p, r or (lambda step, metrics: None), torch.Generator().manual_seed(p.cfg.seed + 1))
        for p, r in zip(preps, reports)
    ]
    stacked = StackedMLP([p.model for p in preps])
    optimizer = build_optimizer(stacked.parameters(), cfg.optimizer, fused=True)
    measure = _Measure(stacked, splits, preps)
    for member, measures in zip(members, measure()):
        member.begin(measures)
    _finish_stopped(members, stacked, cfg.train.epochs, start)
    for epoch in range(1, cfg.train.epochs + 1):
        if not any(m.running for m in members):
            break
        before = [w.detach().clone() for w in stacked.weights]
        batches = [
            data.batch_indices(len(splits.y_train), cfg.batch_size, m.shuffle, splits.y_train.device) for m in members
        ]
        losses, accuracies = _fit_stacked(stacked, optimizer, splits, batches)
        measures = measure(before, len(batches[0]), epoch)
        for k, member in enumerate(members):
            if member.running:
                member.close(epoch, (losses[k], accuracies[k]), measures[k])
        _finish_stopped(members, stacked, cfg.train.epochs, start)
    return [m.result for m in members]


def _finish_stopped(members: list[_Member], stacked: StackedMLP, epochs: int, start: float) -> None:
    """Members that stopped this epoch get their own model's weights back, and their result."""
    stopping = [k for k, m in enumerate(members) if m.running and m.stopped(epochs)]
    stacked.write_back([m.prep.model for m in members], stopping)
    for k in stopping:
        members[k].finish(start)


class _Measure:
    """Every member's epoch measures (validation, update ratios, probe) from vectorized passes."""

    def __init__(self, stacked: StackedMLP, splits: data.Splits, preps: list[PreparedTrial]) -> None:
        self.stacked, self.splits, self.cfg = stacked, splits, preps[0].cfg
        self.probe_batch = probe_samples(splits, self.cfg.train.probe_size)
        self.saturated = [ACTIVATIONS.get(p.cfg.activation.name).saturated for p in preps]

    def __call__(self, before: Optional[list] = None, steps: int = 0, epoch: int = 0) -> list[EpochMeasures]:
        k = self.stacked.size
        vals = evaluate_stacked(self.stacked, self.splits.x_val, self.splits.y_val)
        ratios = diagnostics.update_ratios_stacked(self.stacked.weights, before, steps) if before else [None] * k
        probes = (
            diagnostics.probe_stacked(self.stacked, *self.probe_batch, saturated=self.saturated)
            if probe_due(self.cfg.train, epoch)
            else [None] * k
        )
        return [EpochMeasures(v, r, p) for v, r, p in zip(vals, ratios, probes)]


@torch.no_grad()
def evaluate_stacked(
    stacked: StackedMLP, x: torch.Tensor, y: torch.Tensor, floats: int = 2**24
) -> list[tuple[float, float]]:
    """``train.evaluate`` for every member: (mean loss, accuracy), non-finite logits count as wrong.

    Chunks keep the members' copies of the inputs under ``floats`` values (64 MB)."""
    stacked.train(False)
    k, n = stacked.size, len(y)
    chunk = max(1, floats // (k * max(1, x[0].numel())))
    loss_sum = torch.zeros(k, dtype=torch.float64, device=y.device)
    correct = torch.zeros(k, dtype=torch.int64, device=y.device)
    for i in range(0, n, chunk):
        xs, ys = x[i : i + chunk], y[i : i + chunk]
        logits = stacked(xs.unsqueeze(0).expand(k, *xs.shape))
        targets = ys.unsqueeze(0).expand(k, -1)
        loss_sum += (
            F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(k, -1).sum(dim=1).double()
        )
        finite = torch.isfinite(logits).all(dim=2)
        correct += ((logits.argmax(dim=2) == targets) & finite).sum(dim=1)
    return [(loss / n, hits / n) for loss, hits in zip(loss_sum.tolist(), correct.tolist())]


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
