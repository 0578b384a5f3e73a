"""A study's MLflow record: the parent run, the children's bookkeeping, the end summary.

One experiment per study (named ``study.name``), one parent run for the study (reused when the
study resumes), one child run per trial and seed, tagged with the Optuna trial number and state,
the seed and the Ray node. Every MLflow call goes through ``pipeline.record``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, Optional

import yaml

from pipeline.config import ConfigError
from pipeline.config.stores import masked, masked_tree
from pipeline.record import names
from pipeline.record.provenance import command_line
from pipeline.record.runs import Run, find_runs, reopen_run, runs_with_tag, start_run, tag_run
from pipeline.record.uris import for_workers, local_store
from pipeline.study.plan import StudyPlan
from pipeline.study.summary import study_summary

CLOCK_SKEW_S = 600  # how far a worker node's clock may lag the driver's


@dataclass
class StudyRun:
    plan: StudyPlan
    parent: Run

    @classmethod
    def open(cls, plan: StudyPlan, finished: int = 0) -> StudyRun:
        """Reuse the study's parent run if it exists (resume), else start one.

        ``finished``: the trials its Optuna storage already holds. A study with finished trials
        but no parent run in this store was recorded elsewhere (another ``tracking.uri``): resuming
        would report on nothing, so it is refused before anything is written.
        """
        cfg = plan.cfg
        _warn_if_store_is_local(plan)
        found = find_runs(
            cfg.tracking, cfg.study.name, {names.ROLE_TAG: names.STUDY_ROLE, names.STUDY_TAG: cfg.study.name}
        )
        if not found and finished:
            raise ConfigError(
                f"study {cfg.study.name} has {finished} finished trials in its Optuna storage {plan.storage} but no "
                f"record in the MLflow store {cfg.tracking.uri}: run it with the tracking.uri it was recorded in, "
                "or give it another study.name"
            )
        if found:
            parent = reopen_run(cfg.tracking.uri, found[0])
        else:
            parent = start_run(
                cfg.tracking,
                cfg.study.name,
                run_name=f"study-{cfg.study.name}",
                tags={names.ROLE_TAG: names.STUDY_ROLE, names.STUDY_TAG: cfg.study.name},
            )
            parent.log_params(_study_params(plan))
        references = json.dumps(dict(cfg.study.reference_scales), sort_keys=True)
        parent.set_tags(
            {
                names.N_TRIALS_TARGET_TAG: plan.n_trials,
                names.COMMAND_TAG: command_line(),
                names.REFERENCE_SCALES_TAG: references,
            }
        )
        parent.log_text(yaml.safe_dump(masked_tree(plan.base_config), sort_keys=False), names.STUDY_CONFIG_ARTIFACT)
        return cls(plan, parent)

    def payload(self, config: dict, trial, seed_index: int, oracle) -> dict:
        """What a worker needs for one (trial, seed): plain data and the oracle handle."""
        seed = config["seed"]
        config = {**config, "tracking": for_workers(config["tracking"])}
        return {
            "config": config,
            "experiment": self.plan.cfg.study.name,
            "parent_run_id": self.parent.run_id,
            "run_name": f"trial-{trial.number}-seed-{seed}",
            "tags": self._child_tags(trial.number, seed_index, seed),
            "trial_id": trial._trial_id,
            "seed_index": seed_index,
            "oracle": oracle,
            "cpus": self.plan.cfg.cluster.cpus_per_trial,
        }

    def _child_tags(self, number: int, seed_index: int, seed: int) -> dict:
        return {
            names.STUDY_TAG: self.plan.cfg.study.name,
            names.ROLE_TAG: names.TRIAL_ROLE,
            names.OPTUNA_TRIAL_TAG: number,
            names.SEED_INDEX_TAG: seed_index,
            names.SEED_TAG: seed,
            names.OPTUNA_STATE_TAG: "RUNNING",
        }

    def failed_run(self, number: int, seed_index: int, seed: int, params: dict, reason: str) -> None:
        """A trial whose configuration could not even be built still appears, as FAILED."""
        tags = {**self._child_tags(number, seed_index, seed), names.OPTUNA_STATE_TAG: "FAIL"}
        with start_run(
            self.plan.cfg.tracking, self.plan.cfg.study.name, self.parent.run_id, f"trial-{number}-seed-{seed}", tags
        ) as run:
            run.log_params({k: str(v) for k, v in params.items()})
            run.end("FAILED", reason=reason)

    def trials_ended(self, frozen_trials: list, reason: str) -> None:
        """Tag every run the store holds of trials a dead driver left with Optuna's final state
        (one read of the store, not a search per trial), and end as FAILED, with ``reason``, those
        that finished before the driver died but were never told: the study runs them again. A
        server is searched from the earliest of their starts, less ``CLOCK_SKEW_S`` for nodes
        whose clocks differ."""
        by_number = {str(frozen.number): frozen for frozen in frozen_trials}
        starts = [frozen.datetime_start.timestamp() for frozen in frozen_trials if frozen.datetime_start]
        since_ms = int((min(starts) - CLOCK_SKEW_S) * 1000) if starts else 0
        cfg = self.plan.cfg
        found = runs_with_tag(cfg.tracking, cfg.study.name, names.OPTUNA_TRIAL_TAG, set(by_number), since_ms)
        for run_id, number, status in found:
            tag_run(cfg.tracking.uri, run_id, state_tags(by_number[number]))
            if status == "FINISHED":
                Run(cfg.tracking.uri, run_id).end("FAILED", reason=reason)

    def close_stale_runs(self, reason: str) -> None:
        """End the study's trial runs left RUNNING (by a dead driver, or a stopped study) as FAILED, with the reason."""
        tags: dict[str, Any] = {names.STUDY_TAG: self.plan.cfg.study.name, names.ROLE_TAG: names.TRIAL_ROLE}
        for run_id in find_runs(self.plan.cfg.tracking, self.plan.cfg.study.name, tags, status="RUNNING"):
            Run(self.plan.cfg.tracking.uri, run_id).end("FAILED", reason=reason)

    def finish(self, study, plan: StudyPlan, stopped_by: Optional[BaseException] = None) -> dict:
        """Print and log the summary table, tag the best trial, end the parent run.

        ``stopped_by``: the study stopped itself (too many failures): what ran is summarized all
        the same (the failures' reasons are what the user needs), and the run ends FAILED. The
        study report is the command's to build, once the study is over (pipeline/cli.py).
        """
        summary = study_summary(study, plan.cfg.study.objectives, [a.key for a in plan.axes])
        print(summary["text"], file=sys.stdout)
        self.parent.log_text(summary["text"], names.SUMMARY_ARTIFACT)
        self.parent.log_text(summary["csv"], names.TRIALS_ARTIFACT)
        self.parent.log_metrics(0, summary["metrics"])
        self.parent.set_tags(summary["tags"])
        if stopped_by is None:
            self.parent.end("FINISHED")
        else:
            self.fail(stopped_by)
        return summary

    def fail(self, err: BaseException) -> None:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        self.parent.end(status, reason=f"{type(err).__name__}: {err}")


def state_tags(frozen) -> dict[str, str]:
    """The tags that give a trial's runs Optuna's final state of the trial."""
    return {names.OPTUNA_STATE_TAG: frozen.state.name}


def untagged_runs(frozen, results: dict[int, dict], keys: list[str]) -> list[str]:
    """Those of a trial's runs (``keys``: every attempt's journal key) that do not hold Optuna's
    final state yet: a run is tagged with its own result's state as it ends, which a pruned or
    failed seed can overrule for the whole trial."""
    tagged = {
        r["run_key"]
        for r in results.values()
        if r.get("run_key") and names.optuna_state_of(r["pruned"]) == frozen.state.name
    }
    return [key for key in keys if key not in tagged]


def _warn_if_store_is_local(plan: StudyPlan) -> None:
    """The driver writes every run, but a trial that starts from a recorded run reads its weights
    from the store on the node that runs it: a sqlite file serves one host only."""
    cfg = plan.cfg
    pretrained = "pretrained" in f"{plan.base_config['initializer']} {plan.base_config['space'].get('initializer', '')}"
    if cfg.cluster.address and pretrained and local_store(cfg.tracking.uri) is not None:
        print(
            f"warning: tracking.uri={cfg.tracking.uri} is a sqlite file and cluster.address={cfg.cluster.address}: "
            "trials with initializer=pretrained read their run's weights from it on the node that runs them, "
            "which must see this file at the same path (one machine or a shared filesystem). "
            "Use an MLflow server (docs/cluster.md).",
            file=sys.stderr,
        )


def _study_params(plan: StudyPlan) -> dict[str, str]:
    s = plan.cfg.study
    params = {f"space.{k}": str(v) for k, v in plan.base_config["space"].items()}
    params.update(
        {
            "study.sampler": s.sampler,
            "study.pruner": s.pruner,
            "study.seed": str(s.seed),
            "study.seeds": str(s.seeds),
            names.OBJECTIVES_PARAM: ",".join(s.objectives),
            names.STORAGE_PARAM: masked(plan.storage),  # the report reopens it without the password
        }
    )
    return params
