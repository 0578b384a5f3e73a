"""Width and muP, in figures: the coordinate check, and the width_transfer study's learning-rate curves.

    python scripts/coord_check.py                       # docs/img/coord_check.png, slopes printed
    python scripts/coord_check.py --widths 64 128 256 --seeds 1 --out /tmp/cc.png
    python scripts/coord_check.py --transfer runs/experiments   # docs/img/width_transfer.png + table

The coordinate check (pipeline/engine/coord_check.py) trains 3-layer ReLU MLPs of each width a few
steps on digits, with the standard parametrization and with muP (base width 64), under SGD and
Adam, and draws each layer's mean |x| on a fixed batch at each step against width: a panel per
step, a row per parametrization and optimizer. Under muP every curve is flat after the first
step (at init muP's logits shrink as 1/sqrt(width), by its readout's init); under the standard one
the logits and the last hidden layers grow with width.

``--transfer OUT`` reads the width_transfer study from ``OUT/mlflow.db`` (scripts/run_experiments.sh
width_transfer) and draws the final training loss and the validation accuracy against the learning
rate, a curve per width (a star at its best rate) and a panel per parametrization, and prints the
table (mean ± std, n).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: (parametrization, optimizer, lr, momentum): SGD at a rate where the standard parametrization's
#: growth shows within five steps, Adam at a usual one.
RUNS = [
    ("standard", "sgd", 0.5, 0.0),
    ("mup", "sgd", 0.5, 0.0),
    ("standard", "adam", 0.01, 0.9),
    ("mup", "adam", 0.01, 0.9),
]
LAYERS = ("h1", "h2", "h3", "logits")
NAMES = {"standard": "standard", "ntk": "NTK", "mup": "muP"}


def run_coord_checks(args) -> list[tuple[str, list[dict]]]:
    from pipeline.config import OptimizerConfig
    from pipeline.engine.coord_check import CoordSetup, coord_check

    results = []
    for parametrization, optimizer, lr, momentum in RUNS:
        setup = CoordSetup(
            widths=tuple(args.widths),
            parametrization=parametrization,
            optimizer=OptimizerConfig(name=optimizer, lr=lr, momentum=momentum),
            steps=args.steps,
            seeds=args.seeds,
        )
        title = f"{'muP' if parametrization == 'mup' else 'standard'}, {optimizer.upper()} lr {lr:g}"
        results.append((title, coord_check(setup)))
    return results


def plot_coord_checks(results: list[tuple[str, list[dict]]], steps: int, out: Path) -> None:
    shape = (len(results), steps)
    fig, axes = plt.subplots(*shape, figsize=(2.6 * steps, 2.3 * len(results)), sharex=True, sharey=True)
    for row, (title, rows) in enumerate(results):
        for step in range(1, steps + 1):
            ax = axes[row][step - 1]
            for layer in LAYERS:
                points = sorted((r["width"], r["l1"]) for r in rows if r["layer"] == layer and r["step"] == step)
                ax.plot(*zip(*points), marker="o", markersize=3, label=layer)
            ax.set(xscale="log", yscale="log")
            ax.set_xticks([r["width"] for r in rows if r["layer"] == "h1" and r["step"] == 1])
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            ax.set_title(f"{title}\nstep {step}" if step == 1 else f"step {step}", fontsize=8)
        axes[row][0].set_ylabel("mean |x|", fontsize=8)
    axes[0][-1].legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("width", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def print_slopes(results: list[tuple[str, list[dict]]], steps: int) -> None:
    from pipeline.engine.coord_check import width_slope

    print(f"slope of log mean|x| against log width at step {steps} (0: flat, 1: grows like the width)")
    print("| run | " + " | ".join(LAYERS) + " |")
    print("|---|" + "---|" * len(LAYERS))
    for title, rows in results:
        print(f"| {title} | " + " | ".join(f"{width_slope(rows, layer, steps):+.2f}" for layer in LAYERS) + " |")


# --- the width_transfer study ------------------------------------------------------------------------


def transfer_rows(out_dir: Path) -> tuple[dict[tuple[str, int, float], list[dict]], dict]:
    """(parametrization, width, lr) -> the finished runs' final metrics (a diverged run: inf loss);
    and the study's fixed settings (optimizer, base width) for the labels."""
    from pipeline.record.readback import study_runs

    _, children = study_runs(f"sqlite:///{out_dir}/mlflow.db", "width_transfer")
    setting = {"optimizer": children[0].params["optimizer.name"], "base_width": children[0].params["model.base_width"]}
    cells: dict[tuple[str, int, float], list[dict]] = {}
    for run in children:
        if run.status != "FINISHED":
            continue
        key = (run.params["model.parametrization"], int(run.params["model.width"]), float(run.params["optimizer.lr"]))
        diverged = run.tags.get("diverged") == "true"
        metrics = dict(run.metrics)
        if diverged:
            metrics["train_loss"] = math.inf
        cells.setdefault(key, []).append(metrics)
    return cells, setting


def spread(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        return f"diverged {len(values) - len(finite)}/{len(values)}"
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return f"{statistics.fmean(finite):.3f} ± {std:.3f}"


def print_transfer_table(cells: dict) -> None:
    print("| parametrization | width | lr | n | final train loss | val loss | val accuracy |")
    print("|---|---|---|---|---|---|---|")
    for (param, width, lr), runs in sorted(cells.items()):
        values = {k: [r.get(k, math.inf) for r in runs] for k in ("train_loss", "val_loss", "final_val_accuracy")}
        print(
            f"| {param} | {width} | {lr:g} | {len(runs)} | {spread(values['train_loss'])} "
            f"| {spread(values['val_loss'])} | {spread(values['final_val_accuracy'])} |"
        )
    print()
    print("best lr (lowest mean final train loss) per width:")
    for param in sorted({k[0] for k in cells}):
        best = best_rates(cells, param)
        print(
            f"  {param}: " + ", ".join(f"width {w}: lr {lr:g} ({loss:.3f})" for w, (lr, loss) in sorted(best.items()))
        )


def best_rates(cells: dict, param: str) -> dict[int, tuple[float, float]]:
    """width -> (the lr of lowest mean final training loss, that loss)."""
    best: dict[int, tuple[float, float]] = {}
    for (p, width, lr), runs in cells.items():
        loss = statistics.fmean(r.get("train_loss", math.inf) for r in runs)
        if p == param and (width not in best or loss < best[width][1]):
            best[width] = (lr, loss)
    return best


def plot_transfer(cells: dict, setting: dict, out: Path) -> None:
    """A panel per parametrization and metric, a curve per width; a star at each width's best lr."""
    params = sorted({k[0] for k in cells}, key=lambda p: p != "standard")
    metrics = [("train_loss", "final training loss", "log"), ("final_val_accuracy", "validation accuracy", "linear")]
    fig, axes = plt.subplots(len(metrics), len(params), figsize=(5 * len(params), 3.6 * len(metrics)), sharey="row")
    widths = sorted({k[1] for k in cells})
    colors = plt.cm.viridis([i / max(1, len(widths) - 1) for i in range(len(widths))])
    for col, param in enumerate(params):
        best = best_rates(cells, param)
        for row, (key, label, yscale) in enumerate(metrics):
            ax = axes[row][col]
            for width, color in zip(widths, colors):
                _plot_width(ax, cells, param, width, key, color)
                if key == "train_loss":
                    ax.plot(*best[width], marker="*", markersize=14, color=color, markeredgecolor="black")
            ax.set(xscale="log", yscale=yscale, xlabel=f"learning rate ({setting['optimizer']})", ylabel=label)
            ax.set_title(f"{NAMES[param]} (base width {setting['base_width']})" if param == "mup" else NAMES[param])
            ax.grid(alpha=0.3)
        axes[0][col].legend(fontsize=8, title="width")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def _plot_width(ax, cells: dict, param: str, width: int, key: str, color) -> None:
    """Mean over seeds with a min-max band; a learning rate where any seed diverged is left out."""
    points = []
    for (p, w, lr), runs in sorted(cells.items()):
        values = [r.get(key, math.nan) for r in runs]
        if (
            p == param
            and w == width
            and all(math.isfinite(v) for v in values)
            and not any(not math.isfinite(r.get("train_loss", math.inf)) for r in runs)
        ):
            points.append((lr, statistics.fmean(values), min(values), max(values)))
    if not points:
        return
    lrs, means, lows, highs = zip(*points)
    ax.plot(lrs, means, marker="o", color=color, label=str(width))
    ax.fill_between(lrs, lows, highs, color=color, alpha=0.15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="the PNG (default: docs/img/<figure>.png)")
    parser.add_argument("--transfer", type=Path, default=None, help="a run_experiments.sh OUT holding width_transfer")
    args = parser.parse_args()
    if args.transfer is not None:
        cells, setting = transfer_rows(args.transfer)
        print_transfer_table(cells)
        plot_transfer(cells, setting, args.out or ROOT / "docs/img/width_transfer.png")
        return
    results = run_coord_checks(args)
    print_slopes(results, args.steps)
    plot_coord_checks(results, args.steps, args.out or ROOT / "docs/img/coord_check.png")


if __name__ == "__main__":
    main()
