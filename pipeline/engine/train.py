"""The trial engine: ``run_trial(config, report)`` trains one configured model.

It knows nothing of Ray, Optuna or MLflow. It builds data, model and initializer from the
registries, trains, and calls ``report(epoch, metrics)`` after each epoch (epoch 0 is the state at
initialization); a ``report`` that returns True stops the trial (pruning). A NaN/inf loss is a
result, not an error: the trial stops, ``diverged`` is set with the epoch, and the result returns.

``prepare_trial`` does everything that can fail on bad input (validation, data, model, init)
before any training, so callers can open their records only once it has succeeded.
"""

from __future__ import annotations

import ctypes
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Config, ConfigError, TrainConfig, config_from_dict, validate
from pipeline.engine import data, diagnostics, isometry, theory
from pipeline.engine.augment import batch_augmenter
from pipeline.engine.nn.activations import ACTIVATIONS, activation_gain
from pipeline.engine.nn.initializers import apply_init
from pipeline.engine.nn.models import build_model
from pipeline.engine.nn.recurrent import init_recurrent
from pipeline.engine.nn.resnet import initialize_residual
from pipeline.engine.optim import build_optimizer

Report = Callable[[int, dict], Optional[bool]]


@dataclass
class PreparedTrial:
    cfg: Config
    splits: data.Splits
    model: nn.Module
    device: torch.device
    at_init: dict[str, float] = field(default_factory=dict)  # theory and isometry, logged at epoch 0


@dataclass
class TrialResult:
    final_accuracy: float  # on the held-out test split
    final_val_accuracy: float  # validation accuracy after the last epoch (a study's default objective)
    best_val_accuracy: float
    epochs_to_target: Optional[int]  # None: never reached train.target_accuracy
    diverged: bool
    diverged_epoch: Optional[int]
    pruned: bool
    epochs_run: int
    wall_time_s: float
    history: list[dict] = field(default_factory=list)  # one metrics dict per reported epoch
    layer_table: list[dict] = field(default_factory=list)  # per-layer diagnostics, with "epoch"

    def summary(self) -> dict[str, float]:
        """The end-of-trial metrics, as logged."""
        out = {
            "final_accuracy": self.final_accuracy,
            "final_val_accuracy": self.final_val_accuracy,
            "best_val_accuracy": self.best_val_accuracy,
            "epochs_run": self.epochs_run,
            "wall_time_s": self.wall_time_s,
        }
        if self.epochs_to_target is not None:
            out["epochs_to_target"] = self.epochs_to_target
        return out


def run_trial(config: dict | Config, report: Optional[Report] = None) -> TrialResult:
    """Prepare and train one trial; ``config`` is a resolved config dict or a ``Config``."""
    return train_trial(prepare_trial(config), report)


def prepare_trial(config: dict | Config, device: Optional[str] = None) -> PreparedTrial:
    """Validate, load the data, build and initialize the model. Raises ``ConfigError`` on bad input."""
    cfg = config if isinstance(config, Config) else config_from_dict(config)
    validate(cfg)
    dev = resolve_device(device or cfg.train.device)
    _configure_process(cfg.train.threads)
    splits = data.load_dataset(cfg.dataset, dev)
    if cfg.batch_size > len(splits.y_train):
        raise ConfigError(
            f"batch_size={cfg.batch_size} is larger than the training set ({len(splits.y_train)} samples)"
        )
    model = _built_from_seed(cfg, splits)
    generator = torch.Generator().manual_seed(cfg.seed)
    gain = activation_gain(cfg.activation)
    # Data-dependent schemes (lsuv) read a probe batch of training inputs; init runs on the CPU.
    probe = splits.x_train[: cfg.train.probe_size].cpu()
    apply_init(model, cfg.initializer, cfg.scale, gain, generator, probe=probe)
    init_recurrent(model, cfg.initializer, cfg.scale, gain, generator)
    if cfg.initializer.name != "pretrained":  # loaded weights are the start; nothing is reset on them
        initialize_residual(model)
    at_init = theory_at_init(model, cfg, probe) if cfg.train.diagnostics else {}
    return PreparedTrial(cfg, splits, model.to(dev), dev, at_init)


#: Probe samples whose input-output Jacobians are decomposed (the cost grows with each one).
ISOMETRY_SAMPLES = 8


def theory_at_init(model: nn.Module, cfg: Config, probe: torch.Tensor) -> dict[str, float]:
    """What the network is predicted to do (mean-field theory, where it applies: pipeline/engine/
    theory.py) and the spectrum of its input-output Jacobian (pipeline/engine/isometry.py), on the
    diagnostics' probe inputs, before any update; finite values only (an infinite depth scale,
    at criticality, has no metric). Computed per trial, so batched members get their own."""
    values = {
        **theory.trial_predictions(model, cfg, probe),
        **isometry.isometry_metrics(model, probe[:ISOMETRY_SAMPLES]),
    }
    return {key: value for key, value in values.items() if math.isfinite(value)}


def _built_from_seed(cfg: Config, splits: data.Splits) -> nn.Module:
    """The model as PyTorch's defaults build it, drawn from the trial's seed rather than from
    whatever the process drew before: what the initializer does not set (a pretrained start's
    ``initializer.exclude``) must replay too. The global generator is left as it was."""
    with torch.random.fork_rng(devices=[]):
        # The CPU's generator alone, which builds the model: torch.manual_seed would also queue
        # seeds for every accelerator backend, formatting a stack trace for each (~0.6 ms a trial).
        torch.default_generator.manual_seed(cfg.seed)
        return build_model(cfg.model, cfg.activation, cfg.normalization, splits.input_shape, splits.num_classes)


def resolve_device(name: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``, checked against what this machine has."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    count = torch.cuda.device_count()
    valid = ["auto", "cpu"] + (["cuda"] + [f"cuda:{i}" for i in range(count)] if count else [])
    if name not in valid:
        raise ConfigError(f"train.device={name} is invalid here; valid: {', '.join(valid)}")
    return torch.device(name)


def _configure_process(threads: Optional[int]) -> None:
    """What a trial wants of the process it runs in: its threads, no denormal floats, freed memory kept."""
    if threads:
        torch.set_num_threads(threads)
    # Stalled nets compute with denormal floats and run ~10x slower on CPU.
    torch.set_flush_denormal(True)
    _keep_freed_memory()


#: glibc's mallopt parameters, and the values we give them.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_ABOVE_BYTES, _TRIM_ABOVE_BYTES = 64 << 20, 256 << 20


@functools.lru_cache(maxsize=1)
def _keep_freed_memory() -> None:
    """Let the process reuse freed tensor memory rather than hand it back to the OS and fault it in again.

    With glibc's defaults a freed block of a few MB (a stacked model's layer output) is unmapped
    or trimmed, and the next step's tensor of that size is mapped afresh and page-faulted in: a
    batched grid task of 32 members took ~300k page faults, and ~10% longer. Blocks up to 64 MB
    now come from the heap, which keeps up to 256 MB free before trimming. Other C libraries:
    nothing changes.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_ABOVE_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_ABOVE_BYTES)
    except (OSError, AttributeError):  # not glibc
        pass


def train_trial(prep: PreparedTrial, report: Optional[Report] = None) -> TrialResult:
    """Train a prepared trial epoch by epoch, reporting curves and diagnostics."""
    cfg, model, splits = prep.cfg, prep.model, prep.splits
    report = report or (lambda step, metrics: None)
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    shuffle = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
    augment = batch_augmenter(cfg.dataset.augment, cfg.seed, prep.device)
    optimizer = build_optimizer(model.parameters(), cfg.optimizer)
    probe_batch = probe_samples(splits, cfg.train.probe_size)
    state = TrainState()

    # Epoch 0: the network as initialized, before any update.
    init_metrics = epoch_zero(state, lambda: measure(model, splits, cfg, probe_batch), prep.at_init)
    pruned = bool(report(0, init_metrics))

    for epoch in range(1, cfg.train.epochs + 1):
        if pruned or state.diverged_epoch is not None:
            break
        metrics = _train_epoch(model, optimizer, splits, cfg, (shuffle, augment), epoch, probe_batch, state)
        pruned = bool(report(epoch, metrics))

    # The last epoch measured the model as it is now (unless it diverged): no second validation pass.
    return finish_trial(model, splits, state, pruned, start, val_acc=state.history[-1].get("val_accuracy"))


def finish_trial(
    model, splits: data.Splits, state: TrainState, pruned: bool, start: float, val_acc: Optional[float] = None
) -> TrialResult:
    """The trial's result once it stops: final test/validation accuracy of ``model`` as it is now
    (``val_acc``: its validation accuracy, if already measured on it as it is now)."""
    _, test_acc = evaluate(model, splits.x_test, splits.y_test)
    if val_acc is None:
        _, val_acc = evaluate(model, splits.x_val, splits.y_val)
    return TrialResult(
        final_accuracy=test_acc,
        final_val_accuracy=val_acc,
        best_val_accuracy=state.best_val,
        epochs_to_target=state.epochs_to_target,
        diverged=state.diverged_epoch is not None,
        diverged_epoch=state.diverged_epoch,
        pruned=pruned,
        epochs_run=state.epochs_run,
        wall_time_s=time.perf_counter() - start,
        history=state.history,
        layer_table=state.layer_table,
    )


@dataclass
class TrainState:
    best_val: float = 0.0
    epochs_to_target: Optional[int] = None
    diverged_epoch: Optional[int] = None
    epochs_run: int = 0
    history: list[dict] = field(default_factory=list)
    layer_table: list[dict] = field(default_factory=list)


def probe_samples(splits: data.Splits, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    # The first `size` training samples: fixed across epochs and trials (the split is seeded).
    return splits.x_train[:size], splits.y_train[:size]


def epoch_zero(state: TrainState, measures: Callable[[], EpochMeasures], at_init: Optional[dict] = None) -> dict:
    """Epoch 0: the network as initialized, before any update (``at_init``: ``theory_at_init``'s)."""
    m = measures()
    metrics = {"val_loss": m.val[0], "val_accuracy": m.val[1], **(at_init or {})}
    diag = _tabulate_probe(m.probe, state, epoch=0)
    metrics.update({f"init_{k}": v for k, v in diag.items() if k in ("act_std_ratio", "grad_norm_ratio")})
    if "probe_loss" in diag:
        metrics["init_loss"] = diag["probe_loss"]
    metrics.update(diag)
    state.history.append({"epoch": 0, **metrics})
    return metrics


@dataclass
class EpochMeasures:
    """What closing an epoch measures on the model: validation, per-layer update ratios, the probe."""

    val: tuple[float, float]  # (loss, accuracy)
    ratios: Optional[list[float]] = None  # None at epoch 0
    probe: Optional[diagnostics.Probe] = None  # None with train.diagnostics=false


def measure(
    model: nn.Module, splits: data.Splits, cfg: Config, probe_batch, before=None, steps: int = 0, epoch: int = 0
) -> EpochMeasures:
    """An unbatched trial's measures (a batched one gets them all at once: pipeline/engine/batched.py)."""
    # The probe first: it wants train mode, which training left the model in; evaluate() then sets eval.
    probe = _probe(model, probe_batch, cfg) if probe_due(cfg.train, epoch) else None
    ratios = diagnostics.update_ratios(model, before, steps) if before is not None else None
    return EpochMeasures(evaluate(model, splits.x_val, splits.y_val), ratios, probe)


def probe_due(train: TrainConfig, epoch: int) -> bool:
    """Whether the diagnostics probe runs after ``epoch`` (0: the network as initialized).

    ``log`` probes epochs 0, 1, 2, 4, 8, ... and the last: signal propagation changes most early
    in training, and a probe costs a few training steps' arithmetic, so on a 10-epoch trial this
    is 6 probes instead of 11 (and 9 instead of 101 on a 100-epoch one).
    """
    if not train.diagnostics:
        return False
    return train.probe_schedule == "every" or epoch == train.epochs or epoch & (epoch - 1) == 0


def _train_epoch(model, optimizer, splits, cfg: Config, draws, epoch: int, probe_batch, state: TrainState) -> dict:
    """``draws``: the epoch's randomness, (the shuffle's generator, the augmenter or None)."""
    shuffle, augment = draws
    before = diagnostics.weight_snapshot(model)
    batches = data.batch_indices(len(splits.y_train), cfg.batch_size, shuffle, splits.y_train.device)
    train_loss, train_acc = _fit_batches(model, optimizer, splits, batches, cfg.train.grad_clip, augment)
    measures = lambda: measure(model, splits, cfg, probe_batch, before, len(batches), epoch)  # noqa: E731
    return close_epoch(cfg, epoch, state, (train_loss, train_acc), measures)


def close_epoch(
    cfg: Config, epoch: int, state: TrainState, fit: tuple[float, float], measures: Callable[[], EpochMeasures]
) -> dict:
    """After an epoch's updates: divergence check, then (if finite) validation, update ratios,
    diagnostics, history. ``measures`` is only called for a finite epoch."""
    train_loss, train_acc = fit
    state.epochs_run = epoch
    metrics = {"train_loss": train_loss, "train_accuracy": train_acc}
    if not math.isfinite(train_loss):
        state.diverged_epoch = epoch  # a result: the caller records it, nothing is raised
        state.history.append({"epoch": epoch, **metrics})
        return metrics
    m = measures()
    val_loss, val_acc = m.val
    metrics.update(val_loss=val_loss, val_accuracy=val_acc)
    metrics["update_ratio"] = sum(m.ratios) / len(m.ratios)
    metrics.update(_tabulate_probe(m.probe, state, epoch, m.ratios))
    _track_progress(state, epoch, val_acc, cfg.train.target_accuracy)
    state.history.append({"epoch": epoch, **metrics})
    return metrics


def _fit_batches(model, optimizer, splits: data.Splits, batches, grad_clip, augment=None) -> tuple[float, float]:
    """One pass over the batches; returns mean loss and accuracy (loss is NaN/inf if it diverged).
    ``augment`` (or None) transforms each batch of inputs; accuracy is on what was trained on."""
    model.train()
    loss_sum = torch.zeros((), device=splits.y_train.device)
    correct = torch.zeros((), device=splits.y_train.device)
    for idx in batches:
        x, y = splits.x_train[idx], splits.y_train[idx]
        if augment is not None:
            x = augment(x)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        # Accumulate on the device: no host sync per step. A NaN anywhere poisons the sum.
        loss_sum += loss.detach() * len(idx)
        correct += (logits.argmax(dim=1) == y).sum()
    n = len(splits.y_train)
    return float(loss_sum) / n, float(correct) / n


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> tuple[float, float]:
    """Mean loss and accuracy; a sample whose logits are not finite counts as wrong."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, len(y), chunk):
        logits, target = model(x[i : i + chunk]), y[i : i + chunk]
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        finite = torch.isfinite(logits).all(dim=1)
        correct += int(((logits.argmax(dim=1) == target) & finite).sum())
    return loss_sum / len(y), correct / len(y)


def _probe(model, probe_batch, cfg: Config) -> diagnostics.Probe:
    return diagnostics.probe(model, *probe_batch, saturated=ACTIVATIONS.get(cfg.activation.name).saturated)


def _tabulate_probe(result: Optional[diagnostics.Probe], state: TrainState, epoch: int, ratios=None) -> dict:
    """The probe's rows into the trial's layer table (with each layer's update ratio); its summary."""
    if result is None:
        return {}
    per_row = ratios if ratios and len(ratios) == len(result.layers) else None  # rows are time steps in an RNN
    for i, row in enumerate(result.layers):
        extra = {"update_ratio": per_row[i]} if per_row else {}
        state.layer_table.append({"epoch": epoch, **row, **extra})
    return result.summary


def _track_progress(state: TrainState, epoch: int, val_acc: float, target: float) -> None:
    state.best_val = max(state.best_val, val_acc)
    if state.epochs_to_target is None and val_acc >= target:
        state.epochs_to_target = epoch
