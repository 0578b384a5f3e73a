"""The figures of the study report (the per-trial figure is the record's: pipeline/record/trial_plot.py).

Every study figure is a function of plain data (``TrialRun`` rows, one per trial and seed, and
Optuna's frozen trials) that returns a matplotlib ``Figure``, or raises ``NoFigure`` with the
reason it cannot be drawn (the HTML report shows the reason in its place). Conventions: constrained
layout, a title, axis labels with units, legends with ``n`` (runs) per group; spreads are ± 1 std
over runs unless the title says otherwise. The same axis value keeps the same colour in every
figure (the palette follows the sorted values of the whole study).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

import matplotlib
import numpy as np

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FormatStrFormatter, LogLocator, MaxNLocator, NullFormatter

from pipeline.record.trial_plot import FLOOR

OUTCOMES = ("complete", "diverged", "pruned", "failed")
BEST_PLACE_POINTS = 5000
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
    # The five axes (scale a float, batch_size an int, the others names), the study's other axes and
    # model.depth and activation.slope (numbers), which the theory figures read.
    axes: dict[str, Any]
    final_accuracy: Optional[float] = None  # held-out test accuracy after the last epoch
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> [(epoch, value)]
    layers: list[dict] = field(default_factory=list)  # rows of diagnostics/layers.csv
    reason: str = ""  # why the run failed (its failure_reason tag), if it did
    # Epoch 0's init_* (measured), theory_* (mean-field predictions, where the theory applies) and
    # isometry_* metrics.
    at_init: dict[str, float] = field(default_factory=dict)

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


def _array(values: Iterable[float]) -> np.ndarray:
    """Points for ``scatter`` as an array: matplotlib masks a list point by point (seconds at 10^5)."""
    return np.fromiter(values, dtype=float)


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
    cells: dict[tuple, list[float]] = {(r, c): [] for r in row_values for c in col_values}
    for run in done:
        cells[run.axes.get(rows, "(not recorded)"), run.axes.get(cols, "(not recorded)")].append(run.final_accuracy)
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
            ax.scatter(_array(jitter), _array(values), s=14, alpha=0.6, color="#1f77b4", zorder=3)
        _label(ax, f"by {key}", key, "final test accuracy (fraction)", integer_x=False)
    axes[0, 0].set_ylim(-0.02, 1.02)
    fig.suptitle("Final test accuracy by " + " and by ".join(keys) + " (complete runs; box = quartiles, dots = runs)")
    return fig


def plot_accuracy_vs_scale(
    runs: list[TrialRun],
    key: str = "initializer",
    references: Optional[dict[str, float]] = None,
    predicted: Optional[dict[tuple[Any, Any], float]] = None,
) -> Figure:
    """Final test accuracy against ``scale`` (log x), one colour per initializer; x = diverged runs.

    With critical scales, ``predicted`` per (initializer, activation) (``critical_scales``) or
    ``references`` per activation (``study.reference_scales``, which override the prediction), the
    figure has a panel per initializer and a colour per activation, and marks each critical scale
    with a dashed line beside a star on the measured best.
    """
    done = [r for r in _finished(runs) if isinstance(r.axes.get("scale"), (int, float)) and r.axes["scale"] > 0]
    if not done:
        raise NoFigure("no complete trial has a final accuracy and a positive scale")
    marks = _critical_marks(done, references or {}, predicted or {})
    if not marks:
        return _scale_figure(runs, done, key)
    colors = palette(runs, "activation")
    initializers = values_of(done, "initializer")
    ncols = min(len(initializers), 3)
    fig, axes = _new(ncols, -(-len(initializers) // ncols), size=(7.0, 4.4), sharey=True)
    scales = [r.axes["scale"] for r in done] + [scale for scale, _ in marks.values()]
    for ax, initializer in zip(axes.flat, initializers):
        members = [r for r in done if r.axes.get("initializer") == initializer]
        for value, group in group_runs(members, "activation").items():
            _scale_series(ax, group, colors[value], fmt(value))
            if (initializer, value) in marks:
                _mark_reference(ax, group, colors[value], fmt(value), *marks[initializer, value])
        _scale_axes(ax, scales, f"{fmt(initializer)}: final test accuracy against scale")
        ax.legend(fontsize=7, loc=_legend_place(members))
    for ax in list(axes.flat)[len(initializers) :]:
        ax.set_visible(False)
    fig.suptitle("Accuracy against scale, critical scale dashed (x = diverged)")
    return fig


def _legend_place(points: list) -> str:
    """Where a panel's legend goes: where it hides the fewest points, or, over ``BEST_PLACE_POINTS``
    points (matplotlib counts them for each place it tries: seconds at 10^5), at the lower left."""
    return "best" if len(points) <= BEST_PLACE_POINTS else "lower left"


def _scale_figure(runs: list[TrialRun], done: list[TrialRun], key: str) -> Figure:
    """One panel, a colour per value of ``key``: a study with no critical scale to mark."""
    colors = palette(runs, key)
    fig, axes = _new(1, size=(7.5, 4.4))
    ax = axes[0, 0]
    for value, group in group_runs(done, key).items():
        _scale_series(ax, group, colors[value], fmt(value))
    _scale_axes(ax, [r.axes["scale"] for r in done], "Final test accuracy against initialization scale")
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], color="black", marker="x", linestyle="none"))
    labels.append("diverged run")
    fig.legend(handles, labels, loc="outside right upper", title=f"{key} (runs)")
    return fig


def _scale_axes(ax, scales: list[float], title: str) -> None:
    _log_scale_axis(ax, scales)
    ax.set_ylim(-0.02, 1.02)
    _label(ax, title, "scale (multiplies the initializer's std; log axis)", "final test accuracy (fraction)", False)


def _critical_marks(
    runs: list[TrialRun], references: dict[str, float], predicted: dict[tuple[Any, Any], float]
) -> dict[tuple[Any, Any], tuple[float, str]]:
    """(initializer, activation) -> (critical scale, where it comes from); a reference set for an
    activation overrides the prediction for every initializer."""
    marks = {key: (scale, "mean field") for key, scale in predicted.items()}
    for initializer in values_of(runs, "initializer"):
        for activation in values_of(runs, "activation"):
            if activation in references:
                marks[initializer, activation] = (float(references[activation]), "study.reference_scales")
    return {key: mark for key, mark in marks.items() if math.isfinite(mark[0]) and mark[0] > 0}


def _scale_series(ax, group: list[TrialRun], color, label: str) -> None:
    by_scale = group_runs(group, "scale")
    ax.plot(
        _array(by_scale),
        _array(statistics.fmean(r.final_accuracy for r in g) for g in by_scale.values()),
        color=color,
        alpha=0.5,
        linewidth=1,
    )
    ok = [r for r in group if not r.diverged]
    bad = [r for r in group if r.diverged]
    ax.scatter(
        _array(r.axes["scale"] for r in ok),
        _array(r.final_accuracy for r in ok),
        color=color,
        s=28,
        label=f"{label} (n={len(group)})",
        zorder=3,
    )
    bad_x, bad_y = _array(r.axes["scale"] for r in bad), _array(r.final_accuracy for r in bad)
    ax.scatter(bad_x, bad_y, color=color, s=50, marker="x", zorder=3)


def _mark_reference(ax, group: list[TrialRun], color, label: str, predicted: float, source: str) -> None:
    """A dashed line at the critical scale (``source``: how it was found), a star on the best mean
    accuracy measured."""
    by_scale = group_runs(group, "scale")
    means = {s: statistics.fmean(r.final_accuracy for r in g) for s, g in by_scale.items()}
    best = max(means, key=means.get)
    ax.axvline(
        predicted,
        color=color,
        linestyle="--",
        linewidth=1.2,
        label=f"{label}: predicted critical {predicted:.3g} ({source})",
    )
    ax.scatter(
        [best],
        [means[best]],
        color=color,
        marker="*",
        s=220,
        edgecolors="black",
        zorder=4,
        label=f"{label}: measured best {best:.3g}",
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


# ---- theory beside measurement ------------------------------------------------------------------

DEPTH = "model.depth"
#: (measured, predicted, what it is): the probe's ratios at epoch 0 beside the mean-field ones.
PREDICTED_RATIOS = (
    ("init_grad_norm_ratio", "theory_grad_norm_ratio", "backprop gradient ratio ‖∂L/∂h₁‖ / ‖∂L/∂h_L‖"),
    ("init_act_std_ratio", "theory_act_std_ratio", "activation std ratio, last / first hidden layer"),
)
#: Every epoch-0 metric the figures read: of a large study's runs the report reads only these.
AT_INIT_KEYS = (
    *(key for measured, predicted, _ in PREDICTED_RATIOS for key in (measured, predicted)),
    "theory_sigma_w2",
    "theory_critical_sigma_w2",
    "theory_sigma_b2",
)
MARKERS = "osD^vP*Xh<>p"
TRAINABLE_DEPTHS = 6.0  # Schoenholz et al. 2017: nets train up to about 6 xi_c layers
SAME_SIGMA = 1.02  # grid points whose measured sigma_w^2 agree this closely share a column


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def critical_scale(run: TrialRun) -> Optional[float]:
    """The scale at which this run's net would sit at the edge of chaos: sigma_w^2 grows as
    scale^2, so scale * sqrt(critical sigma_w^2 / sigma_w^2), both read off its weights at init."""
    scale, sigma_w2 = run.axes.get("scale"), run.at_init.get("theory_sigma_w2")
    critical = run.at_init.get("theory_critical_sigma_w2")
    if not (_positive(scale) and _positive(sigma_w2) and _positive(critical)):
        return None
    return scale * math.sqrt(critical / sigma_w2)


def critical_scales(runs: list[TrialRun]) -> dict[tuple[Any, Any], float]:
    """(initializer, activation) -> the median ``critical_scale`` of its runs: the same for every
    run of one pair up to the scatter of the weights drawn (and of the biases, which scale leaves)."""
    found: dict[tuple[Any, Any], list[float]] = defaultdict(list)
    for run in runs:
        value = critical_scale(run)
        if value is not None:
            found[run.axes.get("initializer"), run.axes.get("activation")].append(value)
    return {key: statistics.median(values) for key, values in found.items()}


def plot_theory_vs_measured(runs: list[TrialRun]) -> Figure:
    """Measured against predicted gradient and activation-std ratios at init, log-log, with y = x."""
    if not any(_positive(r.at_init.get(p)) for r in runs for _, p, _ in PREDICTED_RATIOS):
        raise NoFigure(
            "no run has a mean-field prediction: the theory applies to plain MLPs and CNNs (no normalization, "
            "no residual links) with an elementwise activation, and needs train.diagnostics"
        )
    colors, markers = palette(runs, "activation"), dict(zip(values_of(runs, "initializer"), MARKERS * 4))
    fig, axes = _new(2, size=(5.0, 4.6))
    for ax, (measured, predicted, what) in zip(axes[0], PREDICTED_RATIOS):
        pairs = [r for r in runs if _positive(r.at_init.get(measured)) and _positive(r.at_init.get(predicted))]
        groups: dict[tuple, list[TrialRun]] = defaultdict(list)  # one scatter per group: studies of 1000s of runs
        for run in pairs:
            groups[run.axes.get("activation"), run.axes.get("initializer")].append(run)
        for (activation, initializer), group in groups.items():
            x, y = [r.at_init[predicted] for r in group], [r.at_init[measured] for r in group]
            ax.scatter(_array(x), _array(y), color=colors[activation], marker=markers[initializer], s=26, alpha=0.75)
        _identity_line(ax, [v for r in pairs for v in (r.at_init[predicted], r.at_init[measured])])
        _label(ax, f"{what}\n(n = {len(pairs)} runs)", f"predicted ({predicted})", f"measured ({measured})", False)
    handles = _theory_legend(runs, colors, markers)
    fig.legend(handles=handles, loc="outside lower center", fontsize=8, ncols=min(len(handles), 5))
    fig.suptitle("Mean-field prediction against measurement at init (a dot per run; y = x solid)")
    return fig


def _identity_line(ax, values: list[float]) -> None:
    """Log-log axes around ``values`` with y = x and the factor-2 band dotted."""
    low, high = (min(values), max(values)) if values else (0.1, 10.0)
    low, high = low / 2, high * 2
    for factor, style in ((1.0, "-"), (2.0, ":"), (0.5, ":")):
        ax.plot([low, high], [low * factor, high * factor], color="black", linestyle=style, linewidth=0.9)
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_minor_formatter(NullFormatter())
        if high / low < 300:  # under 2.5 decades: 1-2-5 ticks as plain numbers, else powers of 10
            axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(FormatStrFormatter("%g"))
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)


def _theory_legend(runs: list[TrialRun], colors: dict, markers: dict) -> list[Line2D]:
    predicted = [r for r in runs if r.at_init.get("theory_grad_norm_ratio") is not None]
    handles = [
        Line2D([], [], color=colors[a], marker="o", linestyle="none", label=f"{fmt(a)} (colour)")
        for a in values_of(predicted, "activation")
    ]
    handles += [
        Line2D([], [], color="grey", marker=markers[i], linestyle="none", label=f"{fmt(i)} (marker)")
        for i in values_of(predicted, "initializer")
    ]
    return handles + [Line2D([], [], color="black", linestyle=":", label="factor 2 off")]


def trainable_panels(runs: list[TrialRun]) -> dict[Any, list[tuple[float, list[TrialRun]]]]:
    """Activation -> its columns (measured sigma_w^2, runs) for the trainable-region figure: the
    complete runs with a prediction, where at least two depths and two columns were run."""
    done = [r for r in _finished(runs) if _positive(r.at_init.get("theory_sigma_w2")) and _positive(r.axes.get(DEPTH))]
    panels = {}
    for activation, group in group_runs(done, "activation").items():
        columns = _sigma_columns(group)
        if len(columns) > 1 and len({r.axes[DEPTH] for r in group}) > 1:
            panels[activation] = columns
    return panels


def _sigma_columns(runs: list[TrialRun]) -> list[tuple[float, list[TrialRun]]]:
    """The runs by grid point other than depth, at the median sigma_w^2 read off their weights;
    points within ``SAME_SIGMA`` of each other (say, two batch sizes) share a column."""
    points: dict[tuple, list[TrialRun]] = defaultdict(list)
    for run in runs:
        points[tuple(sorted((k, str(v)) for k, v in run.axes.items() if k != DEPTH))].append(run)
    located = sorted(((_median_sigma_w2(g), g) for g in points.values()), key=lambda item: item[0])
    columns: list[tuple[float, list[TrialRun]]] = []
    for sigma_w2, group in located:
        if columns and sigma_w2 <= columns[-1][0] * SAME_SIGMA:
            columns[-1] = (columns[-1][0], columns[-1][1] + group)
        else:
            columns.append((sigma_w2, group))
    return [(_median_sigma_w2(g), g) for _, g in columns]


def _median_sigma_w2(runs: list[TrialRun]) -> float:
    return statistics.median(r.at_init["theory_sigma_w2"] for r in runs)


def plot_trainable_region(runs: list[TrialRun]) -> Figure:
    """Final test accuracy over sigma_w^2 (read off the weights) x depth, per activation, with the
    mean-field trainable depth 6 xi_c drawn over it (computed, for the runs' median sigma_b^2)."""
    panels = trainable_panels(runs)
    if not panels:
        raise NoFigure(
            "needs complete runs with a mean-field prediction at two or more depths (model.depth) and two or "
            "more weight variances (scale, or another axis that changes sigma_w^2)"
        )
    fig, axes = _new(len(panels), size=(6.6, 4.8))
    for ax, (activation, columns) in zip(axes[0], panels.items()):
        image = _region_cells(ax, columns)
        runs_here = [r for _, g in columns for r in g]
        sigma_b2 = statistics.median(r.at_init.get("theory_sigma_b2", 0.0) for r in runs_here)
        _trainable_curve(ax, activation, runs_here[0].axes.get("activation.slope"), sigma_b2)
        title, depth = f"{fmt(activation)}, σ_b² = {sigma_b2:.3g}", "depth (hidden layers, log axis)"
        _label(ax, title, "σ_w² (read off the weights at init)", depth, False)
        ax.grid(False)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncols=2)
    fig.colorbar(image, ax=axes[0, -1], label="mean final test accuracy (fraction)")
    fig.suptitle("Trainable region: final test accuracy over σ_w² × depth\n(cells: mean over seeds; red: 6 ξ_c)")
    return fig


def _region_cells(ax, columns: list[tuple[float, list[TrialRun]]]):
    """The heatmap: a cell per (column, depth), its mean accuracy written in it; depth on a log axis."""
    depths = sorted({r.axes[DEPTH] for _, g in columns for r in g})
    cells = [[[r.final_accuracy for r in g if r.axes[DEPTH] == d] for _, g in columns] for d in depths]
    grid = np.array([[statistics.fmean(c) if c else np.nan for c in row] for row in cells])
    centres = [x for x, _ in columns]
    log_x = centres[-1] / centres[0] > 4  # a wide range of variances (say, several decades of scale)
    x_edges, y_edges = _edges(centres, log=log_x), _edges(depths, log=True)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    image = ax.pcolormesh(x_edges, y_edges, np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0)
    for i, depth in enumerate(depths):
        for j, (x, _) in enumerate(columns):
            if cells[i][j]:
                text_color = "black" if grid[i, j] > 0.55 else "white"
                ax.text(x, depth, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7, color=text_color)
    ax.set_yscale("log")
    ax.set_yticks(depths, [str(d) for d in depths])
    ax.yaxis.set_minor_formatter(NullFormatter())
    if log_x:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(centres, [f"{x:.3g}" for x in centres], fontsize=8)
    ax.set_xlim(x_edges[0], x_edges[-1])
    ax.set_ylim(y_edges[0], y_edges[-1])
    return image


def _edges(centers: list[float], log: bool) -> np.ndarray:
    """Cell edges halfway between centres (in log for a log axis), the outer cells as wide as their neighbours."""
    c = np.log(np.asarray(centers, dtype=float)) if log else np.asarray(centers, dtype=float)
    mids = (c[1:] + c[:-1]) / 2
    edges = np.concatenate([[2 * c[0] - mids[0]], mids, [2 * c[-1] - mids[-1]]])
    if log:
        return np.exp(edges)
    edges[0] = edges[0] if edges[0] > 0 else c[0] / 2  # a variance is positive
    return edges


def _trainable_curve(ax, activation: str, slope: Any, sigma_b2: float) -> None:
    """6 xi_c against sigma_w^2 over the panel's x range, and the critical sigma_w^2 dotted."""
    from pipeline.config import ActivationConfig
    from pipeline.engine import theory  # PyTorch: only studies that draw this figure load it

    cfg = ActivationConfig(name=activation, **({"slope": float(slope)} if _positive(slope) else {}))
    low, high = ax.get_xlim()
    critical = theory.critical_sigma_w2(cfg, sigma_b2)
    at = lambda s: theory.predict(cfg, float(s), sigma_b2, depth=1).trainable_depth  # noqa: E731
    x, y = _curve(at, low, high, critical if critical is not None and low < critical < high else None)
    top = ax.get_ylim()[1] * 10  # an infinite depth scale leaves the panel through its top
    ax.plot(x, np.where(np.isfinite(y), y, top), color="#d62728", linewidth=2.0, label="6 ξ_c (mean field)")
    if critical is not None and low <= critical <= high:
        ax.axvline(critical, color="#d62728", linestyle=":", linewidth=1.2, label=f"critical σ_w² = {critical:.3g}")


def _curve(at: Callable[[float], float], low: float, high: float, critical: Optional[float]):
    """(x, y) of ``at`` over [low, high], smooth on either side of ``critical``, where it diverges.

    Evaluated at points spaced geometrically in the distance to the critical point, then
    interpolated (monotone cubic in log distance, log value): the chaotic side costs ~0.4 s a point
    (the correlation's fixed point by root finding), so it gets few.
    """
    if critical is None:
        x = np.linspace(low, high, 24)
        return x, np.array([at(s) for s in x])
    sides = [_side(at, critical, low, 1e-2, 12), _side(at, critical, high, 3e-2, 5)]
    x = np.concatenate([sides[0][0][::-1], [critical], sides[1][0]])
    return x, np.concatenate([sides[0][1][::-1], [math.inf], sides[1][1]])


def _side(at: Callable[[float], float], critical: float, end: float, nearest: float, points: int):
    """One side of the critical point: 200 interpolated points from it (exclusive) to ``end``,
    from ``points`` evaluations, the nearest at ``nearest`` of the way (6 xi_c is far off the
    panel closer in: the interpolation's extrapolation only has to go up)."""
    from scipy.interpolate import PchipInterpolator

    distance = abs(end - critical) * np.geomspace(nearest, 1.0, points)
    values = np.array([at(critical + math.copysign(d, end - critical)) for d in distance])
    fine = abs(end - critical) * np.geomspace(1e-3, 1.0, 200)
    finite = np.isfinite(values) & (values > 0)
    if finite.sum() < 2:
        return critical + np.sign(end - critical) * fine, np.full(len(fine), math.inf)
    logs = PchipInterpolator(np.log(distance[finite]), np.log(values[finite]), extrapolate=True)(np.log(fine))
    return critical + np.sign(end - critical) * fine, np.exp(logs)


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
    tally = Counter(outcomes.values())  # (outcome, initializer) -> trials
    counts = [sum(n for (o, _), n in tally.items() if o == name) for name in names]
    bars = axes[0, 0].bar(names, counts, color=[OUTCOME_COLORS[n] for n in names])
    axes[0, 0].bar_label(bars)
    _label(axes[0, 0], f"All {len(outcomes)} trials", "outcome", "trials")
    axes[0, 0].set_ylim(0, max(counts) * 1.15 + 0.5)
    inits = sorted({i for _, i in outcomes.values()}, key=_sort_key)
    bottom = [0] * len(inits)
    for name in names:
        heights = [tally[name, init] for init in inits]
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
    best = list(itertools.accumulate(values, pick))
    label = f"complete trial (n={len(complete)})"
    ax.scatter(_array(numbers), _array(values), color="#1f77b4", s=24, zorder=3, label=label)
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
