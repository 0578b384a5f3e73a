"""The per-trial figure logged with every trial run: signal propagation by depth."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt

FLOOR = 1e-12  # a log axis cannot show 0 (zeros init): such points are drawn at this floor


def plot_signal_by_depth(layer_table: list[dict], path: Path | BinaryIO) -> None:
    """Activation std and backprop gradient norm by layer, one line per diagnosed epoch (log y)."""
    epochs = sorted({row["epoch"] for row in layer_table})
    shown = epochs if len(epochs) <= 4 else [epochs[0], epochs[1], epochs[len(epochs) // 2], epochs[-1]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for epoch in shown:
        rows = [r for r in layer_table if r["epoch"] == epoch]
        layers = [r["layer"] for r in rows]
        label = "init" if epoch == 0 else f"epoch {epoch}"
        axes[0].plot(layers, [above_floor(r["act_std"]) for r in rows], marker="o", label=label)
        axes[1].plot(layers, [above_floor(r["grad_norm"]) for r in rows], marker="o", label=label)
    _style(axes[0], "Activation std by depth", "std of layer output")
    _style(axes[1], "Backprop gradient by depth", "||dL/dh|| (pre-activation)")
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def above_floor(value: float) -> float:
    return max(value, FLOOR)


def _style(ax, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("hidden layer (1 = first)")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.legend()
    ax.grid(True, alpha=0.3)
