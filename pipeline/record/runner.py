"""One trial trained and recorded: the glue between the trial engine and the MLflow record.

Used by ``trial``, ``reproduce`` and the study's workers alike (the workers through
``run_recorded_batch``, which trains same-shaped trials together: pipeline/engine/batched.py). The order
matters: everything that can fail on bad input happens in ``prepare_trial`` BEFORE the MLflow run
is opened, and once it is open the recorder's context guarantees it ends (FINISHED, FAILED with a
reason, or KILLED).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

from pipeline.config import Config, ConfigError, TrackingConfig, config_from_dict, config_to_dict, validate
from pipeline.engine.batched import train_batch
from pipeline.engine.download import ensure_dataset
from pipeline.engine.train import PreparedTrial, TrialResult, prepare_trial, train_trial
from pipeline.record import names
from pipeline.record.artifacts import download_weights, log_trial_artifacts
from pipeline.record.provenance import trial_params
from pipeline.record.runs import start_run as start_mlflow_run
from pipeline.record.uris import check_reachable, check_writable

EpochHook = Callable[[int, dict], Optional[bool]]
#: ``runs.start_run``, or a look-alike that records elsewhere (a study worker's journal: pipeline/record/journal.py).
StartRun = Callable[..., Any]


@dataclass
class RecordedTrial:
    run_id: str
    result: TrialResult
    experiment: str


def run_recorded_trial(
    config: dict,
    experiment: Optional[str] = None,
    parent_run_id: Optional[str] = None,
    tags: Optional[dict] = None,
    on_epoch: Optional[EpochHook] = None,
    run_name: Optional[str] = None,
    record_failures: bool = False,
) -> RecordedTrial:
    """Prepare, open a run, train with per-epoch logging, record the outcome, end the run.

    ``on_epoch`` sees every epoch's metrics after they are logged; returning True prunes the trial.
    With ``record_failures`` (a study's trials: every trial must appear) bad input still raises,
    but only after a FAILED run with the reason is recorded.
    """
    request = TrialRequest(config, experiment, parent_run_id, tags, on_epoch, run_name)
    ready = _prepare(request, record_failures, start_mlflow_run)
    with _recording(ready) as report:
        result = train_trial(ready.prepared, report)
        _record_outcome(ready, result)
    return RecordedTrial(ready.recorder.run_id, result, ready.experiment)


@dataclass
class TrialRequest:
    """One trial to train and record: ``run_recorded_trial``'s arguments, for a batch of them."""

    config: dict
    experiment: Optional[str] = None
    parent_run_id: Optional[str] = None
    tags: Optional[dict] = None
    on_epoch: Optional[EpochHook] = None
    run_name: Optional[str] = None


def run_recorded_batch(
    requests: list[TrialRequest], start_run: StartRun = start_mlflow_run
) -> list[RecordedTrial | ConfigError]:
    """Trials with one ``grouping.batch_key`` (pipeline/study/grouping.py), trained together and each recorded in its own run.

    A member whose config is bad gets a FAILED run and its ``ConfigError`` in the returned list;
    the others train on. An error during training fails every member's run and propagates.
    Runs are opened with ``start_run``.
    """
    outcomes: list[RecordedTrial | ConfigError] = []
    ready: list[_Ready] = []
    for request in requests:
        try:
            ready.append(_prepare(request, record_failures=True, start_run=start_run))
            outcomes.append(None)
        except ConfigError as err:
            outcomes.append(err)
    batch_id = uuid.uuid4().hex if len(ready) > 1 else None
    with contextlib.ExitStack() as stack:
        reports = [
            stack.enter_context(_recording(r, len(ready), _batch_tags(batch_id, i))) for i, r in enumerate(ready)
        ]
        preps = [r.prepared for r in ready]
        results = (
            train_batch(preps, reports) if len(ready) > 1 else [train_trial(p, rep) for p, rep in zip(preps, reports)]
        )
        for r, result in zip(ready, results):
            _record_outcome(r, result)
    done = iter(RecordedTrial(r.recorder.run_id, result, r.experiment) for r, result in zip(ready, results))
    return [outcome if outcome is not None else next(done) for outcome in outcomes]


def run_recorded_in_batch(
    configs: list[dict], member: int, experiment: str, tags: Optional[dict] = None
) -> RecordedTrial:
    """Train ``configs`` together, as one batch in this order, and record member ``member`` alone.

    ``reproduce`` replays a trial that trained in a batch this way: its batch-mates only make the
    same arithmetic happen (a batch's matmuls round differently with other members, or alone).
    """
    ready = _prepare(
        TrialRequest(configs[member], experiment, tags=tags), record_failures=False, start_run=start_mlflow_run
    )
    preps = [ready.prepared if i == member else prepare_trial(config) for i, config in enumerate(configs)]
    with _recording(ready, len(configs)) as report:
        reports = [report if i == member else None for i in range(len(configs))]
        result = train_batch(preps, reports)[member]
        _record_outcome(ready, result)
    return RecordedTrial(ready.recorder.run_id, result, ready.experiment)


def _batch_tags(batch_id: Optional[str], index: int) -> dict:
    """A batch member's place in its batch: what replays it exactly (``run_recorded_in_batch``)."""
    return {} if batch_id is None else {names.BATCH_ID_TAG: batch_id, names.BATCH_INDEX_TAG: index}


@dataclass
class _Ready:
    """A prepared trial and what its run needs; ``recorder`` is set once the run is open."""

    request: TrialRequest
    experiment: str
    cfg: Config
    resolved: dict
    prepared: PreparedTrial
    start_run: StartRun
    recorder: Optional[Any] = None  # a runs.Run, or a journal's look-alike


def _prepare(request: TrialRequest, record_failures: bool, start_run: StartRun) -> _Ready:
    config, name = request.config, request.experiment or request.config["tracking"]["experiment"]
    try:
        cfg = config_from_dict(config)
        # The complete config (keys deleted with ~key come back with their defaults), taken before
        # prepare_trial swaps a pretrained run_id for a local path: what reproduce must re-run.
        complete = config_to_dict(cfg)
        validate(cfg)  # bad input fails before anything is made, folders included
        if start_run is start_mlflow_run:  # a journal's store is the driver's business
            check_reachable(cfg.tracking.uri)
            check_writable(cfg.tracking.uri, cfg.tracking.artifact_root)
        ensure_dataset(cfg.dataset)  # fetched (or offline: one line) before any run is opened
        fetch_pretrained(cfg)
        prepared = prepare_trial(cfg)
    except ConfigError as err:
        if record_failures:
            _record_unstarted(config, name, request, err, start_run)
        raise
    resolved = dict(complete, initializer={**complete["initializer"], "name": cfg.initializer.name})
    return _Ready(request, name, cfg, resolved, prepared, start_run)


def fetch_pretrained(cfg: Config) -> None:
    """``initializer.run_id`` -> a local copy of that run's weights, read from the trial's own store:
    the one route by which a pretrained start reaches MLflow (the engine loads files only)."""
    if cfg.initializer.name == "pretrained" and cfg.initializer.run_id:
        cfg.initializer.path = str(download_weights(cfg.initializer.run_id, cfg.tracking.uri))
        cfg.initializer.run_id = None


@contextlib.contextmanager
def _recording(
    ready: _Ready, batch_size: int = 1, batch_tags: Optional[dict] = None
) -> Iterator[Callable[[int, dict], Optional[bool]]]:
    """The trial's open run (ended whatever happens) and the per-epoch ``report`` that logs to it."""
    request = ready.request
    tags = {
        **(request.tags or {}),
        **({names.BATCH_SIZE_TAG: batch_size, **(batch_tags or {})} if batch_size > 1 else {}),
    }
    with ready.start_run(
        ready.cfg.tracking, ready.experiment, request.parent_run_id, request.run_name, tags, reproducible=True
    ) as recorder:
        ready.recorder = recorder
        # K runs trained together flush K times as often: spread them so the store sees the same
        # write rate as one trial (each write costs ~20 ms on sqlite, whatever its size).
        recorder.flush_every_s *= batch_size
        # With the first metric write (at most FLUSH_EVERY_S from now; a short trial's only write).
        recorder.log_params(
            trial_params(ready.resolved), tags={names.DEVICE_TAG: str(ready.prepared.device)}, buffered=True
        )

        def report(step: int, metrics: dict) -> Optional[bool]:
            recorder.log_metrics(step, metrics, buffered=True)
            return request.on_epoch(step, metrics) if request.on_epoch else None

        yield report


def _record_unstarted(
    config: dict, experiment: str, request: TrialRequest, err: Exception, start_run: StartRun
) -> None:
    tracking_cfg = TrackingConfig(**config["tracking"])
    with start_run(tracking_cfg, experiment, request.parent_run_id, request.run_name, request.tags) as run:
        run.log_params(trial_params(config))
        run.end("FAILED", reason=f"ConfigError: {err}")


def _record_outcome(ready: _Ready, result: TrialResult) -> None:
    recorder, tracking_cfg = ready.recorder, ready.cfg.tracking
    # Buffered: the final metrics and tags reach the store in one write, when the run ends.
    recorder.log_metrics(result.epochs_run, result.summary(), buffered=True)
    tags = {
        names.DIVERGED_TAG: str(result.diverged).lower(),
        names.DIVERGED_EPOCH_TAG: result.diverged_epoch if result.diverged else "",
        names.PRUNED_TAG: str(result.pruned).lower(),
    }
    if names.OPTUNA_STATE_TAG in (ready.request.tags or {}):  # a study's trial
        tags[names.OPTUNA_STATE_TAG] = names.optuna_state_of(result.pruned)
    recorder.set_tags(tags, buffered=True)
    model = ready.prepared.model if tracking_cfg.log_weights else None
    log_trial_artifacts(recorder, ready.resolved, result.layer_table, model, plot=tracking_cfg.layer_plot)
