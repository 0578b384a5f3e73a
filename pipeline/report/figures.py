"""The figures of the study report (the per-trial figure is the record's: pipeline/record/trial_plot.py).

Every study figure is a function of plain data (``TrialRun`` rows, one per trial and seed, and
Optuna's frozen trials) that returns a matplotlib ``Figure``, or raises ``NoFigure`` with the
reason it cannot be drawn (the HTML report shows the reason in its place). Conventions: constrained
layout, a title, axis labels with units, legends with ``n`` (runs) per group; spreads are ± 1 std
over runs unless the title says otherwise. The same axis value keeps the same colour in every
figure (the palette follows the sorted values of the whole study).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FormatStrFormatter, LogLocator, MaxNLocator, NullFormatter

from pipeline.record.trial_plot import FLOOR

OUTCOMES = ("complete", "diverged", "pruned", "failed")
OUTCOME_COLORS = {
    "complete": "#2ca02c",
    "diverged": "#ff7f0e",
    "pruned": "#7f7f7f",
    "failed": "#d62728",
    "running": "#1f77b4",
}


class NoFigure(Exception):
    """A figure cannot be drawn from this study's data; the message says why."""


@dataclass
class TrialRun:
    """One run of a study (one trial, one seed), as the figures need it."""

    trial: int
    seed: int
    state: str  # Optuna's final state: COMPLETE | PRUNED | FAIL (RUNNING while in flight)
    diverged: bool
    axes: dict[str, Any]  # the five axes; scale a float, batch_size an int, the others names
    final_accuracy: Optional[float] = None  # held-out test accuracy after the last epoch
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> [(epoch, value)]
    layers: list[dict] = field(default_factory=list)  # rows of diagnostics/layers.csv
    reason: str = ""  # why the run failed (its failure_reason tag), if it did

    @property
    def outcome(self) -> str:
        if self.state == "FAIL":
            return "failed"
        if self.state == "PRUNED":
            return "pruned"
        if self.state == "COMPLETE":
            return "diverged" if self.diverged else "complete"
        return "running"


# ---- grouping helpers --------------------------------------------------------------------------


def _sort_key(value: Any):
    return (isinstance(value, str), value)


def values_of(runs: Iterable[TrialRun], key: str) -> list:
    """The distinct values of axis ``key`` over ``runs``, in natural order (numbers numerically)."""
    return sorted({r.axes.get(key, "(not recorded)") for r in runs}, key=_sort_key)


def group_runs(runs: Iterable[TrialRun], key: str) -> dict[Any, list[TrialRun]]:
    groups: dict[Any, list[TrialRun]] = defaultdict(list)
    for run in runs:
        groups[run.axes.get(key, "(not recorded)")].append(run)
    return {value: groups[value] for value in sorted(groups, key=_sort_key)}


def palette(all_runs: list[TrialRun], key: str) -> dict[Any, Any]:
    """A colour per value of ``key``, fixed by the whole study (the same in every figure)."""
    cmap = plt.get_cmap("tab10" if len(values_of(all_runs, key)) <= 10 else "tab20")
    return {value: cmap(i % cmap.N) for i, value in enumerate(values_of(all_runs, key))}


def _finished(runs: list[TrialRun]) -> list[TrialRun]:
    """Runs whose final accuracy is a real outcome: complete (diverged included), not pruned/failed."""
    return [r for r in runs if r.state == "COMPLETE" and r.final_accuracy is not None]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(value: Any) -> str:
    """An axis value as a label: floats to 3 significant digits."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _new(ncols: int, nrows: int = 1, size: tuple[float, float] = (5.0, 4.0), **kwargs):
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), layout="constrained", squeeze=False, **kwargs
    )
    return fig, axes


# ---- convergence ---------------------------------------------------------------------------------


def plot_convergence(runs: list[TrialRun], key: str) -> Figure:
    """Validation accuracy and loss by epoch, one line per value of ``key`` (mean, ± spread band)."""
    usable = [r for r in runs if r.state != "FAIL" and r.curves.get("val_accuracy")]
    if not usable:
        raise NoFigure("no run logged a validation curve (every trial failed before training?)")
    colors = palette(runs, key)
    fig, axes = _new(2, size=(5.2, 4.2))
    for value, group in group_runs(usable, key).items():
        label = f"{fmt(value)} (n={len(group)})"
        _band(axes[0, 0], [r.curves.get("val_accuracy", []) for r in group], colors[value], label, log=False)
        _band(axes[0, 1], [r.curves.get("val_loss", []) for r in group], colors[value], label, log=True)
    _label(
        axes[0, 0], "Validation accuracy (mean ± 1 std)", "epoch (0 = at initialization)", "accuracy (fraction correct)"
    )
    _label(
        axes[0, 1],
        "Validation loss (geometric mean ×/÷ std)",
        "epoch (0 = at initialization)",
        "cross-entropy (nats, log scale)",
    )
    axes[0, 0].set_ylim(-0.02, 1.02)
    axes[0, 1].set_yscale("log")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), title=f"{key} (runs)")
    fig.suptitle(f"Convergence by {key}: validation curves over runs (seeds and trials)")
    return fig


def _band(ax, curves: list[list[tuple[int, float]]], color, label: str, log: bool) -> None:
    """Mean line and spread band of several (epoch, value) curves of possibly different lengths."""
    by_epoch: dict[int, list[float]] = defaultdict(list)
    for curve in curves:
        for epoch, value in curve:
            if math.isfinite(value):
                by_epoch[epoch].append(math.log10(max(value, FLOOR)) if log else value)
    epochs = sorted(by_epoch)
    stats = [_mean_std(by_epoch[e]) for e in epochs]
    mean = [m for m, _ in stats]
    low, high = [m - s for m, s in stats], [m + s for m, s in stats]
    if log:
        mean, low, high = ([10**v for v in seq] for seq in (mean, low, high))
    ax.plot(epochs, mean, color=color, marker="o", markersize=3, label=label)
    ax.fill_between(epochs, low, high, color=color, alpha=0.18, linewidth=0)


def _label(ax, title: str, xlabel: str, ylabel: str, integer_x: bool = True) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


# ---- final accuracy ------------------------------------------------------------------------------


def plot_accuracy_heatmap(runs: list[TrialRun], rows: str = "initializer", cols: str = "activation") -> Figure:
    """Mean final test accuracy per (initializer, activation) cell, annotated mean ± std and n."""
    done = _finished(runs)
    if not done:
        raise NoFigure("no complete trial has a final accuracy")
    row_values, col_values = values_of(done, rows), values_of(done, cols)
    cells = {
        (r, c): [x.final_accuracy for x in done if x.axes.get(rows) == r and x.axes.get(cols) == c]
        for r in row_values
        for c in col_values
    }
    grid = [[_mean_std(cells[r, c])[0] if cells[r, c] else math.nan for c in col_values] for r in row_values]
    fig, axes = _new(1, size=(2.2 + 1.7 * len(col_values), 1.6 + 0.75 * len(row_values)))
    ax = axes[0, 0]
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    image = ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for i, r in enumerate(row_values):
        for j, c in enumerate(col_values):
            ax.text(
                j,
                i,
                _cell_text(cells[r, c]),
                ha="center",
                va="center",
                fontsize=8.5,
                color="black" if cells[r, c] and grid[i][j] > 0.55 else "white" if cells[r, c] else "#555555",
            )
    ax.set_xticks(range(len(col_values)), [fmt(c) for c in col_values])
    ax.set_yticks(range(len(row_values)), [fmt(r) for r in row_values])
    ax.set_xlabel(cols)
    ax.set_ylabel(rows)
    fig.colorbar(image, ax=ax, label="mean final test accuracy (fraction)")
    ax.set_title(f"Final test accuracy by {rows} × {cols}\n(mean ± std over complete runs, n runs per cell)")
    return fig


def _cell_text(values: list[float]) -> str:
    if not values:
        return "no runs"
    mean, std = _mean_std(values)
    return f"{mean:.3f} ± {std:.3f}\nn={len(values)}"


def plot_accuracy_by_category(runs: list[TrialRun], keys: tuple[str, ...] = ("normalization", "batch_size")) -> Figure:
    """Box plots (with every run as a dot) of final test accuracy per value of each of ``keys``."""
    done = _finished(runs)
    if not done:
        raise NoFigure("no complete trial has a final accuracy")
    fig, axes = _new(len(keys), size=(4.6, 4.0), sharey=True)
    for ax, key in zip(axes[0], keys):
        groups = group_runs(done, key)
        data = [[r.final_accuracy for r in g] for g in groups.values()]
        ax.boxplot(
            data,
            tick_labels=[f"{fmt(v)}\nn={len(g)}" for v, g in groups.items()],
            widths=0.5,
            medianprops={"color": "black"},
            showfliers=False,
        )
        for i, values in enumerate(data, start=1):
            jitter = [i + 0.18 * ((k % 5) - 2) / 2 for k in range(len(values))]
            ax.scatter(jitter, values, s=14, alpha=0.6, color="#1f77b4", zorder=3)
        _label(ax, f"by {key}", key, "final test accuracy (fraction)", integer_x=False)
    axes[0, 0].set_ylim(-0.02, 1.02)
    fig.suptitle("Final test accuracy by " + " and by ".join(keys) + " (complete runs; box = quartiles, dots = runs)")
    return fig


def plot_accuracy_vs_scale(
    runs: list[TrialRun], key: str = "initializer", references: Optional[dict[str, float]] = None
) -> Figure:
    """Final test accuracy against ``scale`` (log x), one colour per initializer; x = diverged runs.

    With ``references`` (predicted critical scale per activation, e.g. the edge of chaos) the
    colours are activations, and each prediction is a dashed line beside a star on the measured best.
    """
    done = [r for r in _finished(runs) if isinstance(r.axes.get("scale"), (int, float)) and r.axes["scale"] > 0]
    if not done:
        raise NoFigure("no complete trial has a final accuracy and a positive scale")
    key = "activation" if references else key
    colors = palette(runs, key)
    fig, axes = _new(1, size=(7.5, 4.4))
    ax = axes[0, 0]
    for value, group in group_runs(done, key).items():
        _scale_series(ax, group, colors[value], fmt(value))
        if references and value in references:
            _mark_reference(ax, group, colors[value], fmt(value), references[value])
    _log_scale_axis(ax, [r.axes["scale"] for r in done])
    ax.set_ylim(-0.02, 1.02)
    _label(
        ax,
        "Final test accuracy against initialization scale",
        "scale (multiplies the initializer's std; log axis)",
        "final test accuracy (fraction)",
        integer_x=False,
    )
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], color="black", marker="x", linestyle="none"))
    labels.append("diverged run")
    fig.legend(handles, labels, loc="outside right upper", title=f"{key} (runs)")
    return fig


def _scale_series(ax, group: list[TrialRun], color, label: str) -> None:
    by_scale = group_runs(group, "scale")
    ax.plot(
        list(by_scale),
        [statistics.fmean(r.final_accuracy for r in g) for g in by_scale.values()],
        color=color,
        alpha=0.5,
        linewidth=1,
    )
    ok = [r for r in group if not r.diverged]
    bad = [r for r in group if r.diverged]
    ax.scatter(
        [r.axes["scale"] for r in ok],
        [r.final_accuracy for r in ok],
        color=color,
        s=28,
        label=f"{label} (n={len(group)})",
        zorder=3,
    )
    ax.scatter([r.axes["scale"] for r in bad], [r.final_accuracy for r in bad], color=color, s=50, marker="x", zorder=3)


def _mark_reference(ax, group: list[TrialRun], color, label: str, predicted: float) -> None:
    """A dashed line at the predicted critical scale, a star on the best mean accuracy measured."""
    by_scale = group_runs(group, "scale")
    means = {s: statistics.fmean(r.final_accuracy for r in g) for s, g in by_scale.items()}
    best = max(means, key=means.get)
    ax.axvline(
        predicted, color=color, linestyle="--", linewidth=1.2, label=f"{label}: predicted critical {predicted:g}"
    )
    ax.scatter(
        [best],
        [means[best]],
        color=color,
        marker="*",
        s=220,
        edgecolors="black",
        zorder=4,
        label=f"{label}: measured best {best:g}",
    )


def _log_scale_axis(ax, values: list[float]) -> None:
    """A log x axis with plain-number ticks (powers of 2 over a narrow range, of 10 otherwise)."""
    ax.set_xscale("log")
    low, high = min(values), max(values)
    base = 2 if high / low <= 256 else 10
    ax.xaxis.set_major_locator(LogLocator(base=base, numticks=12))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(low / 1.25, high * 1.25)


# ---- signal propagation and unit health at initialization ---------------------------------------


def plot_signal_at_init(runs: list[TrialRun]) -> Figure:
    """Activation std and backprop gradient norm by depth at init (epoch 0), per initializer (and activation)."""
    diagnosed = [r for r in runs if any(row.get("epoch") == 0 for row in r.layers)]
    if not diagnosed:
        raise NoFigure(
            "no run has per-layer diagnostics at initialization (train.diagnostics=false, or every trial "
            "failed before training)"
        )
    keys = ["initializer"] + (["activation"] if len(values_of(diagnosed, "activation")) > 1 else [])
    depth, grad = _depth_labels(diagnosed)
    fig, axes = _new(2, nrows=len(keys), size=(5.4, 3.9))
    for row_axes, key in zip(axes, keys):
        colors = palette(runs, key)
        for value, group in group_runs(diagnosed, key).items():
            label = f"{fmt(value)} (n={len(group)})"
            for ax, column in zip(row_axes, ("act_std", "grad_norm")):
                layers, means = _geo_mean_by_layer(group, column, epoch=0)
                ax.plot(layers, means, color=colors[value], marker="o", markersize=3, label=label)
        _label(row_axes[0], f"Activation std by depth, by {key}", depth, "std of layer output (log scale)")
        _label(row_axes[1], f"Backprop gradient by depth, by {key}", depth, grad)
        for ax in row_axes:
            ax.set_yscale("log")
        row_axes[1].legend(title=key, fontsize=8, loc="best")
    fig.suptitle(
        "Signal propagation at initialization (epoch 0, geometric mean over runs): "
        "flat = healthy, falling = vanishing, rising = exploding"
    )
    return fig


def _depth_labels(runs: list[TrialRun]) -> tuple[str, str]:
    """Axis labels: recurrent nets' tables have a row per time step of the top layer, not per layer."""
    recurrent = [any("time_step" in row for row in r.layers) for r in runs]
    if all(recurrent):
        return "time step (top recurrent layer; 1 = first)", "‖∂L/∂h_t‖, hidden state (log scale)"
    if not any(recurrent):
        return "hidden layer (1 = first)", "‖∂L/∂h‖, pre-activation (log scale)"
    return "hidden layer, or time step for recurrent nets", "‖∂L/∂h‖ (log scale)"


def _geo_mean_by_layer(runs: list[TrialRun], column: str, epoch: int) -> tuple[list[int], list[float]]:
    by_layer: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        for row in run.layers:
            value = row.get(column)
            if row.get("epoch") == epoch and isinstance(value, float) and math.isfinite(value):
                by_layer[int(row["layer"])].append(math.log10(max(value, FLOOR)))
    layers = sorted(by_layer)
    return layers, [10 ** statistics.fmean(by_layer[layer]) for layer in layers]


def plot_unit_health(runs: list[TrialRun]) -> Figure:
    """Dead (and, for tanh/sigmoid, saturated) unit fractions at init and at the last epoch."""
    diagnosed = [r for r in runs if r.layers]
    if not diagnosed:
        raise NoFigure("no run has per-layer diagnostics (train.diagnostics=false, or every trial failed)")
    columns = ["dead_fraction"] + (
        ["saturated_fraction"] if any("saturated_fraction" in row for r in diagnosed for row in r.layers) else []
    )
    fig, axes = _new(2, nrows=len(columns), size=(5.4, 3.6))
    for row_axes, column in zip(axes, columns):
        for ax, key in zip(row_axes, ("initializer", "activation")):
            _health_bars(ax, diagnosed, key, column)
    axes[0, 0].legend(fontsize=8, loc="upper left")
    fig.suptitle(
        "Dead units (input ≤ 0 on every probe sample) and saturated units (tanh |h|>0.99, sigmoid h<0.01 "
        "or >0.99)\nmean over layers, bars = mean over runs, whiskers = ± 1 std"
    )
    return fig


def _health_bars(ax, runs: list[TrialRun], key: str, column: str) -> None:
    groups = group_runs([r for r in runs if _layer_mean(r, column, "first") is not None], key)
    if not groups:
        ax.text(
            0.5,
            0.5,
            f"no {column.replace('_', ' ')} recorded\n(only tanh/sigmoid saturate)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    for offset, when, color in ((-0.2, "first", "#9ecae1"), (0.2, "last", "#08519c")):
        stats = [_mean_std([v for r in g if (v := _layer_mean(r, column, when)) is not None]) for g in groups.values()]
        ax.bar(
            [i + offset for i in range(len(groups))],
            [m for m, _ in stats],
            width=0.4,
            yerr=[s for _, s in stats],
            color=color,
            capsize=3,
            label="at initialization" if when == "first" else "after the last epoch",
        )
    ax.set_xticks(range(len(groups)), [f"{fmt(v)}\nn={len(g)}" for v, g in groups.items()], fontsize=8)
    center, half = (len(groups) - 1) / 2, max(len(groups), 2) / 2  # one group must not fill the panel
    ax.set_xlim(center - half - 0.2, center + half + 0.2)
    ax.set_ylim(0, 1.05)
    _label(ax, f"{column.replace('_', ' ')} by {key}", key, "fraction of hidden units", integer_x=False)


def _layer_mean(run: TrialRun, column: str, when: str) -> Optional[float]:
    rows = [row for row in run.layers if isinstance(row.get(column), float) and row.get("epoch") is not None]
    if not rows:
        return None
    epochs = sorted({row["epoch"] for row in rows})
    epoch = epochs[0] if when == "first" else epochs[-1]
    return statistics.fmean(row[column] for row in rows if row["epoch"] == epoch)


# ---- outcomes and the Optuna view ----------------------------------------------------------------


def trial_outcomes(runs: list[TrialRun]) -> dict[int, tuple[str, Any]]:
    """Trial number -> (outcome, initializer): diverged if any seed diverged, else Optuna's state."""
    trials: dict[int, list[TrialRun]] = defaultdict(list)
    for run in runs:
        trials[run.trial].append(run)
    rank = {name: i for i, name in enumerate(("failed", "pruned", "diverged", "running", "complete"))}
    return {
        n: (min((r.outcome for r in rs), key=rank.get), rs[0].axes.get("initializer", "(not recorded)"))
        for n, rs in sorted(trials.items())
    }


def plot_trial_outcomes(runs: list[TrialRun]) -> Figure:
    """How many trials completed, diverged, were pruned or failed: overall and per initializer."""
    outcomes = trial_outcomes(runs)
    if not outcomes:
        raise NoFigure("the study has no trial runs")
    names = list(OUTCOMES) + (["running"] if any(o == "running" for o, _ in outcomes.values()) else [])
    fig, axes = _new(2, size=(5.0, 3.8))
    counts = [sum(o == name for o, _ in outcomes.values()) for name in names]
    bars = axes[0, 0].bar(names, counts, color=[OUTCOME_COLORS[n] for n in names])
    axes[0, 0].bar_label(bars)
    _label(axes[0, 0], f"All {len(outcomes)} trials", "outcome", "trials")
    axes[0, 0].set_ylim(0, max(counts) * 1.15 + 0.5)
    inits = sorted({i for _, i in outcomes.values()}, key=_sort_key)
    bottom = [0] * len(inits)
    for name in names:
        heights = [sum(o == name and i == init for o, i in outcomes.values()) for init in inits]
        axes[0, 1].bar(range(len(inits)), heights, bottom=bottom, color=OUTCOME_COLORS[name], label=name)
        bottom = [b + h for b, h in zip(bottom, heights)]
    axes[0, 1].set_xticks(range(len(inits)), [fmt(i) for i in inits], rotation=30, ha="right")
    _label(axes[0, 1], "Trials by initializer", "initializer", "trials", integer_x=False)
    axes[0, 1].yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Trial outcomes (diverged = complete with a non-finite loss in some seed)")
    return fig


def plot_param_importances(importances: dict[str, float], objective: str) -> Figure:
    """Horizontal bars of Optuna's parameter importances (largest on top), annotated."""
    if not importances:
        raise NoFigure("no parameter importance to show")
    names = sorted(importances, key=importances.get)
    fig, axes = _new(1, size=(6.5, 0.9 + 0.45 * len(names)))
    ax = axes[0, 0]
    bars = ax.barh(names, [importances[n] for n in names], color="#1f77b4")
    ax.bar_label(bars, fmt="%.3f", padding=3)
    ax.set_xlim(0, max(importances.values()) * 1.2 or 1.0)
    _label(
        ax,
        f"Parameter importances for {objective} (Optuna fANOVA)",
        "importance (share of the objective's variance)",
        "study axis",
        integer_x=False,
    )
    return fig


def plot_optimization_history(trials: list, objective: str, direction: str) -> Figure:
    """Objective by trial number with the best-so-far line; pruned and failed trials marked on the axis."""
    complete = [t for t in trials if t.state.name == "COMPLETE" and t.values]
    if not complete:
        raise NoFigure("no complete trial: nothing to plot")
    fig, axes = _new(1, size=(7.5, 4.2))
    ax = axes[0, 0]
    numbers = [t.number for t in complete]
    values = [t.values[0] for t in complete]
    pick: Callable = max if direction == "maximize" else min
    best = [pick(values[: i + 1]) for i in range(len(values))]
    ax.scatter(numbers, values, color="#1f77b4", s=24, zorder=3, label=f"complete trial (n={len(complete)})")
    ax.step(numbers, best, where="post", color="#d62728", label=f"best so far ({direction})")
    for state, name, marker in (("PRUNED", "pruned", "v"), ("FAIL", "failed", "x")):
        marked = [t.number for t in trials if t.state.name == state]
        if marked:
            ax.plot(
                marked,
                [0.03] * len(marked),
                linestyle="none",
                marker=marker,
                color=OUTCOME_COLORS[name],
                transform=ax.get_xaxis_transform(),
                label=f"{name} trial (n={len(marked)})",
            )
    _label(ax, f"Optimization history: {objective} by trial", "trial number (Optuna)", f"{objective} (objective)")
    fig.legend(loc="outside right upper")
    return fig
