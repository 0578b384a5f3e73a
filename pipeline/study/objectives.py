"""What a study optimizes, and how a trial's seeds become one Optuna outcome.

Objectives are names of a trial's end metrics. ``val_accuracy`` (the default) is the validation
accuracy after the last epoch: the test split (``final_accuracy``) stays held out for reporting.
With ``study.seeds=k`` the objective is the mean over the k seeds, and the spread is kept.
"""

from __future__ import annotations

import statistics
from typing import Optional

from optuna.trial import TrialState

from pipeline.config import ConfigError

DIRECTIONS = {
    "val_accuracy": "maximize",
    "best_val_accuracy": "maximize",
    "final_accuracy": "maximize",
    "epochs_to_target": "minimize",
    "wall_time_s": "minimize",
}


def direction(name: str) -> str:
    if name not in DIRECTIONS:
        raise ConfigError(f"study.objectives: unknown objective '{name}'; valid: {', '.join(DIRECTIONS)}")
    return DIRECTIONS[name]


def value(name: str, result: dict) -> float:
    """One seed's objective value from a worker's result."""
    summary = result["summary"]
    if name == "val_accuracy":
        return summary["final_val_accuracy"]
    if name == "epochs_to_target":
        # Never reaching the target counts as one epoch more than the budget.
        return summary.get("epochs_to_target", result["epochs"] + 1)
    return summary[name]


def outcome(results: dict[int, dict], failures: dict[int, str], seeds: list[int], names: list[str]):
    """``(state, values, user_attrs)`` for Optuna's tell, from every seed's result or failure."""
    attrs = {"seeds": seeds, "run_ids": [r["run_id"] for r in results.values()]}
    if failures:
        return TrialState.FAIL, None, {**attrs, "failure_reason": next(iter(failures.values()))}
    if any(r["pruned"] for r in results.values()):
        return TrialState.PRUNED, None, {**attrs, "pruned": True}
    values = []
    for name in names:
        per_seed = [value(name, results[i]) for i in sorted(results)]
        values.append(statistics.fmean(per_seed))
        attrs[f"{name}_per_seed"] = per_seed
        attrs[f"{name}_std"] = _std(per_seed)
    attrs["n_seeds"] = len(results)
    attrs["diverged_seeds"] = sum(r["diverged"] for r in results.values())
    return TrialState.COMPLETE, values, attrs


def _std(values: list[float]) -> Optional[float]:
    return statistics.stdev(values) if len(values) > 1 else 0.0
