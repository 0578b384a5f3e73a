"""One trial trained and recorded: the glue between the trial engine and the MLflow record.

Used by ``trial``, ``reproduce`` and the study's workers alike. The order matters: everything that
can fail on bad input happens in ``prepare_trial`` BEFORE the MLflow run is opened, and once it is
open the recorder's context guarantees it ends (FINISHED, FAILED with a reason, or KILLED).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from pipeline import tracking
from pipeline.config import config_from_dict, config_to_dict
from pipeline.errors import ConfigError
from pipeline.train import TrialResult, prepare_trial, train_trial

EpochHook = Callable[[int, dict], Optional[bool]]


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
    name = experiment or config["tracking"]["experiment"]
    try:
        cfg = config_from_dict(config)
        # The complete config (keys deleted with ~key come back with their defaults), taken before
        # prepare_trial swaps a pretrained run_id for a local path: what reproduce must re-run.
        complete = config_to_dict(cfg)
        tracking.check_reachable(cfg.tracking.uri)
        prepared = prepare_trial(cfg)
    except ConfigError as err:
        if record_failures:
            _record_unstarted(config, name, parent_run_id, run_name, tags, err)
        raise
    resolved = dict(complete, initializer={**complete["initializer"], "name": cfg.initializer.name})
    with tracking.start_run(cfg.tracking, name, parent_run_id, run_name, tags) as recorder:
        recorder.log_params(tracking.trial_params(resolved), tags={
            "device": str(prepared.device), "reproduce": f"python -m pipeline reproduce {recorder.run_id}"})

        def report(step: int, metrics: dict) -> Optional[bool]:
            recorder.log_metrics(step, metrics, buffered=True)
            return on_epoch(step, metrics) if on_epoch else None

        result = train_trial(prepared, report)
        _record_outcome(recorder, result, resolved, prepared.model, cfg.tracking)
    return RecordedTrial(recorder.run_id, result, name)


def _record_unstarted(config: dict, experiment: str, parent_run_id, run_name, tags, err: Exception) -> None:
    from pipeline.config import TrackingConfig

    tracking_cfg = TrackingConfig(**config["tracking"])
    with tracking.start_run(tracking_cfg, experiment, parent_run_id, run_name, tags) as run:
        run.log_params(tracking.trial_params(config))
        run.end("FAILED", reason=f"ConfigError: {err}")


def _record_outcome(recorder, result: TrialResult, config: dict, model, tracking_cfg) -> None:
    # Buffered: the final metrics and tags reach the store in one write, when the run ends.
    recorder.log_metrics(result.epochs_run, result.summary(), buffered=True)
    recorder.set_tags({
        "diverged": str(result.diverged).lower(),
        "diverged_epoch": result.diverged_epoch if result.diverged else "",
        "pruned": str(result.pruned).lower(),
    }, buffered=True)
    model = model if tracking_cfg.log_weights else None
    tracking.log_trial_artifacts(recorder, config, result.layer_table, model, plot=tracking_cfg.layer_plot)
