"""The end-of-study summary: best configurations and, per axis, mean ± std of the objective.

Pure functions over Optuna's frozen trials, so the report and tests can use them too. A float axis
(e.g. ``scale``) is summarized in four bins of its sampled values; every other axis by value.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections import defaultdict
from typing import Any

from optuna.trial import TrialState

from pipeline.record import names


def study_summary(study, objectives: list[str], axis_keys: list[str]) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    # A trial a stopped driver left is queued again when the study resumes: not a failure of its own.
    interrupted = sum(bool(t.user_attrs.get("interrupted")) for t in trials)
    counts = {
        state: sum(t.state == state and not t.user_attrs.get("interrupted") for t in trials)
        for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    }
    best = _best(study, complete, objectives)
    lines = [
        f"## Study {study.study_name}: {counts[TrialState.COMPLETE]} complete, "
        f"{counts[TrialState.PRUNED]} pruned, {counts[TrialState.FAIL]} failed"
        + (f" ({interrupted} interrupted by a stopped driver, run again)" if interrupted else ""),
        "",
    ]
    lines += _best_table(best, objectives) + [""]
    for key in axis_keys:
        lines += _axis_table(key, complete, objectives[0]) + [""]
    metrics = {
        names.N_COMPLETE_METRIC: counts[TrialState.COMPLETE],
        names.N_PRUNED_METRIC: counts[TrialState.PRUNED],
        names.N_FAILED_METRIC: counts[TrialState.FAIL],
    }
    tags = {}
    if best:
        metrics.update({f"best_{name}": v for name, v in zip(objectives, best[0].values)})
        tags = {names.BEST_TRIAL_TAG: best[0].number, names.BEST_PARAMS_TAG: json.dumps(best[0].params, sort_keys=True)}
    return {"text": "\n".join(lines), "csv": _trials_csv(trials, objectives), "metrics": metrics, "tags": tags}


def _best(study, complete: list, objectives: list[str]) -> list:
    if len(objectives) > 1:
        return list(study.best_trials)  # the Pareto front
    reverse = study.direction.name == "MAXIMIZE"
    return sorted(complete, key=lambda t: t.values[0], reverse=reverse)[:5]


def _best_table(best: list, objectives: list[str]) -> list[str]:
    header = "| trial | " + " | ".join(f"{o} (mean ± std, n)" for o in objectives) + " | params |"
    rows = [header, "|" + "---|" * (len(objectives) + 2)]
    for t in best:
        cells = [
            _mean_std(v, t.user_attrs.get(f"{o}_std"), t.user_attrs.get("n_seeds", 1))
            for o, v in zip(objectives, t.values)
        ]
        rows.append(f"| {t.number} | " + " | ".join(cells) + f" | {_params(t.params)} |")
    return ["Best configurations:", ""] + rows


def _axis_table(key: str, complete: list, objective: str) -> list[str]:
    groups = _group_by(key, [t for t in complete if key in t.params])
    rows = [f"By {key} ({objective}, mean ± std over trials, n):", "", f"| {key} | {objective} | n |", "|---|---|---|"]
    for label, values in groups.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(f"| {label} | {statistics.fmean(values):.4f} ± {std:.4f} | {len(values)} |")
    return rows


def _group_by(key: str, trials: list) -> dict[str, list[float]]:
    groups: dict[str, list[float]] = defaultdict(list)
    values = [t.params[key] for t in trials]
    if values and all(isinstance(v, float) for v in values) and len(set(values)) > 4:
        edges, low, high = statistics.quantiles(values, n=4), min(values), max(values)
        for t in trials:
            groups[_bin_label(t.params[key], edges, low, high)].append(t.values[0])
        return dict(sorted(groups.items()))
    for value in sorted(set(values), key=lambda v: (isinstance(v, str), v)):
        groups[_label(value)] = [t.values[0] for t in trials if t.params[key] == value]
    return dict(groups)


def _label(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _bin_label(value: float, edges: list[float], low: float, high: float) -> str:
    bounds = [low, *edges, high]
    for i in range(4):
        if value <= bounds[i + 1] or i == 3:
            return f"[{bounds[i]:.3g}, {bounds[i + 1]:.3g}]"
    return "?"


def _mean_std(value: float, std, n: int) -> str:
    return f"{value:.4f} ± {std or 0.0:.4f} (n={n})"


def _params(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _trials_csv(trials: list, objectives: list[str]) -> str:
    keys = sorted({k for t in trials for k in t.params})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["number", "state", *objectives, *keys, "failure_reason"])
    for t in trials:
        values = t.values or [None] * len(objectives)
        writer.writerow(
            [t.number, t.state.name, *values, *(t.params.get(k) for k in keys), t.user_attrs.get("failure_reason", "")]
        )
    return out.getvalue()
