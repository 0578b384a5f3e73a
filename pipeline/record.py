"""A study's MLflow record: the parent run, the children's bookkeeping, the end summary.

One experiment per study (named ``study.name``), one parent run for the study (reused when the
study resumes), one child run per trial and seed, tagged with the Optuna trial number and state,
the seed and the Ray node. Every MLflow call goes through ``pipeline.tracking``.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from pipeline import tracking
from pipeline.plan import StudyPlan
from pipeline.runner import implied_state
from pipeline.summary import study_summary

STUDY_TAG = "initstudy.study"
ROLE_TAG = "initstudy.role"


@dataclass
class StudyRecord:
    plan: StudyPlan
    parent: tracking.Run
    _closed: dict[int, list[str]] = field(default_factory=dict)  # trial number -> stale runs ended

    @classmethod
    def open(cls, plan: StudyPlan) -> "StudyRecord":
        """Reuse the study's parent run if it exists (resume), else start one."""
        cfg = plan.cfg
        _warn_if_store_is_local(cfg)
        found = tracking.find_runs(cfg.tracking, cfg.study.name, {ROLE_TAG: "study", STUDY_TAG: cfg.study.name})
        if found:
            parent = tracking.reopen_run(cfg.tracking.uri, found[0])
        else:
            parent = tracking.start_run(cfg.tracking, cfg.study.name, run_name=f"study-{cfg.study.name}",
                                        tags={ROLE_TAG: "study", STUDY_TAG: cfg.study.name})
            parent.log_params(_study_params(plan))
        parent.set_tags({"n_trials_target": plan.n_trials, "command": tracking.command_line(),
                         "reference_scales": json.dumps(dict(cfg.study.reference_scales), sort_keys=True)})
        parent.log_text(yaml.safe_dump(plan.base_config, sort_keys=False), "study_config.yaml")
        return cls(plan, parent)

    def payload(self, config: dict, trial, seed_index: int, oracle) -> dict:
        """What a worker needs for one (trial, seed): plain data and the oracle handle."""
        seed = config["seed"]
        config = {**config, "tracking": tracking.for_workers(config["tracking"])}
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
        return {STUDY_TAG: self.plan.cfg.study.name, ROLE_TAG: "trial", "optuna_trial": number,
                "seed_index": seed_index, "seed": seed, "optuna_state": "RUNNING"}

    def failed_run(self, number: int, seed_index: int, seed: int, params: dict, reason: str) -> None:
        """A trial whose configuration could not even be built still appears, as FAILED."""
        tags = {**self._child_tags(number, seed_index, seed), "optuna_state": "FAIL"}
        with tracking.start_run(self.plan.cfg.tracking, self.plan.cfg.study.name, self.parent.run_id,
                                f"trial-{number}-seed-{seed}", tags) as run:
            run.log_params({k: str(v) for k, v in params.items()})
            run.end("FAILED", reason=reason)

    def trial_ended(self, frozen, results: dict[int, dict]) -> None:
        """Tag every run of the trial with Optuna's final state, where its worker did not already."""
        tagged = {r["run_id"] for r in results.values() if r.get("run_id") and implied_state(r["pruned"]) == frozen.state.name}
        for run_id in self._runs_of(frozen.number, results):
            if run_id not in tagged:
                tracking.Run(self.plan.cfg.tracking.uri, run_id).set_tags({"optuna_state": frozen.state.name})

    def _runs_of(self, number: int, results: dict[int, dict]) -> list[str]:
        """The trial's runs: those its workers returned and those ``close_stale_runs`` ended.

        A seed without a result (its worker failed, or the trial never launched) recorded a run
        whose id the driver never saw: then, and only then, the store is searched (a search per
        trial cost the driver more than the tags it sets).
        """
        closed = self._closed.pop(number, [])
        if len(results) == len(self.plan.seeds()) and all(r.get("run_id") for r in results.values()):
            return [r["run_id"] for r in results.values()] + closed
        tags = {STUDY_TAG: self.plan.cfg.study.name, "optuna_trial": number}
        return tracking.find_runs(self.plan.cfg.tracking, self.plan.cfg.study.name, tags)

    def close_stale_runs(self, reason: str, trial_number: Optional[int] = None, seed_index: Optional[int] = None,
                         keep: Optional[str] = None, attempt: Optional[int] = None) -> None:
        """End runs left RUNNING by a dead worker (or a dead driver) as FAILED, with the reason.

        ``keep`` is the run of the attempt that returned; if that was the task's first attempt
        (``attempt=0``, from ``cluster.worker_context``), no worker died before it and there is
        nothing to search for.
        """
        if keep is not None and attempt == 0:
            return
        tags: dict[str, Any] = {STUDY_TAG: self.plan.cfg.study.name, ROLE_TAG: "trial"}
        if trial_number is not None:
            tags.update(optuna_trial=trial_number, seed_index=seed_index)
        for run_id in tracking.find_runs(self.plan.cfg.tracking, self.plan.cfg.study.name, tags, status="RUNNING"):
            if run_id != keep:
                tracking.Run(self.plan.cfg.tracking.uri, run_id).end("FAILED", reason=reason)
                if trial_number is not None:  # trial_ended tags it with the trial's state too
                    self._closed.setdefault(trial_number, []).append(run_id)

    def finish(self, study, plan: StudyPlan, stopped_by: Optional[BaseException] = None) -> dict:
        """Print and log the summary table, tag the best trial, build the report, end the parent run.

        ``stopped_by``: the study stopped itself (too many failures): what ran is summarized and
        reported all the same (the failures' reasons are what the user needs), and the run ends FAILED.
        """
        summary = study_summary(study, plan.cfg.study.objectives, [a.key for a in plan.axes])
        print(summary["text"], file=sys.stdout)
        self.parent.log_text(summary["text"], "summary.md")
        self.parent.log_text(summary["csv"], "trials.csv")
        self.parent.log_metrics(0, summary["metrics"])
        self.parent.set_tags(summary["tags"])
        if plan.cfg.study.report:
            self._report(plan)
        if stopped_by is None:
            self.parent.end("FINISHED")
        else:
            self.fail(stopped_by)
        return summary

    def _report(self, plan: StudyPlan) -> None:
        """Build the study report (pipeline/study_report.py); its failure is a warning, not a failed study."""
        from pipeline.study_report import build_report

        cfg = plan.cfg
        try:
            path = build_report(cfg.study.name, cfg.tracking.uri, cfg.study.output_dir, storage=plan.storage)
            print(f"report: {path}", file=sys.stdout)
        except Exception as err:
            reason = f"{type(err).__name__}: {' '.join(str(err).split())[:500]}"
            self.parent.set_tags({"report_error": reason})
            print(f"warning: the study report failed ({reason}); rebuild it with "
                  f"python -m pipeline report {cfg.study.name}", file=sys.stderr)

    def fail(self, err: BaseException) -> None:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        self.parent.end(status, reason=f"{type(err).__name__}: {err}")


def _warn_if_store_is_local(cfg) -> None:
    """On a cluster every node writes its trials' runs: a sqlite file serves one host only."""
    if cfg.cluster.address and tracking.local_store(cfg.tracking.uri) is not None:
        print(f"warning: tracking.uri={cfg.tracking.uri} is a sqlite file and cluster.address={cfg.cluster.address}: "
              "every Ray node must see this file at the same path (one machine or a shared filesystem); "
              "nodes on other hosts fail their trials. Use an MLflow server (docs/cluster.md).", file=sys.stderr)


def _study_params(plan: StudyPlan) -> dict[str, str]:
    s = plan.cfg.study
    params = {f"space.{k}": str(v) for k, v in plan.base_config["space"].items()}
    params.update({"study.sampler": s.sampler, "study.pruner": s.pruner, "study.seed": str(s.seed),
                   "study.seeds": str(s.seeds), "study.objectives": ",".join(s.objectives), "storage": plan.storage})
    return params
