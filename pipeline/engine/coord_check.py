"""The coordinate check: how large each layer's activations get over the first training steps, as
width grows (Yang et al. 2021, Tensor Programs V, section 4 and the ``mup`` package's coord-check
plots). It is the test of a correct muP: there every layer's typical coordinate, mean |x|, stays
the same at every width; under the standard parametrization the updates grow with width, and so,
after the first step, do the logits and the last hidden layer.

``coord_check`` trains MLPs of several widths for a few steps on a dataset's training batches and
records, at each step (step 1 is the network at init, step t after t - 1 updates), each hidden
layer's output and the logits on a fixed probe batch: their size, mean |x|, and how much the
updates changed them, mean |x_t - x_1|, averaged over seeds. ``width_slope`` fits log(mean |x|)
against log(width): about 0 where a layer is stable in width, 1 where it grows like the width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pipeline.config import (
    ActivationConfig,
    DatasetConfig,
    InitializerConfig,
    ModelConfig,
    NormalizationConfig,
    OptimizerConfig,
)
from pipeline.engine import data
from pipeline.engine.nn.activations import activation_gain
from pipeline.engine.nn.initializers import apply_init
from pipeline.engine.nn.models import build_model
from pipeline.engine.nn.network import Network
from pipeline.engine.optim import build_optimizer


@dataclass
class CoordSetup:
    """One coordinate check: the MLP, its training and the widths it is built at."""

    widths: tuple[int, ...] = (64, 128, 256, 512)
    parametrization: str = "standard"
    base_width: int = 64
    depth: int = 3
    activation: str = "relu"
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(name="sgd", lr=0.5, momentum=0.0))
    steps: int = 5
    seeds: int = 3
    batch_size: int = 64
    dataset: str = "digits"


def coord_check(setup: CoordSetup) -> list[dict]:
    """Rows ``{width, step, layer, l1, delta}``, averaged over the seeds: on a fixed probe batch,
    ``l1`` is the mean |x| of ``layer`` at ``step`` and ``delta`` the mean |x_step - x_1|, what the
    updates so far have changed (Tensor Programs V plots the latter's size).

    Layers are ``h1`` .. ``h<depth>`` (each hidden block's output) and ``logits``.
    """
    splits = data.load_dataset(DatasetConfig(name=setup.dataset), torch.device("cpu"))
    totals: dict[tuple[int, int, str], list[float]] = {}
    for width in setup.widths:
        for seed in range(setup.seeds):
            for step, sizes in enumerate(_train_recording(setup, width, seed, splits), start=1):
                for layer, values in sizes.items():
                    total = totals.setdefault((width, step, layer), [0.0, 0.0])
                    for i, value in enumerate(values):
                        total[i] += value / setup.seeds
    return [{"width": w, "step": s, "layer": n, "l1": v[0], "delta": v[1]} for (w, s, n), v in totals.items()]


def _train_recording(setup: CoordSetup, width: int, seed: int, splits: data.Splits) -> list[dict[str, tuple]]:
    """Train one MLP ``setup.steps`` steps on random batches; before each, every layer's (mean |x|,
    mean |x - x at init|) on the probe batch (the first ``batch_size`` training samples)."""
    model = _built(setup, width, seed, splits)
    optimizer = build_optimizer(model.parameters(), setup.optimizer)
    batches = torch.Generator().manual_seed(seed)
    probe, records, at_init = splits.x_train[: setup.batch_size], [], None
    for _ in range(setup.steps):
        outputs = _layer_outputs(model, probe)
        at_init = at_init or outputs
        records.append({k: (x.abs().mean().item(), (x - at_init[k]).abs().mean().item()) for k, x in outputs.items()})
        idx = torch.randint(0, len(splits.y_train), (setup.batch_size,), generator=batches)
        optimizer.zero_grad()
        F.cross_entropy(model(splits.x_train[idx]), splits.y_train[idx]).backward()
        optimizer.step()
    return records


def _built(setup: CoordSetup, width: int, seed: int, splits: data.Splits) -> Network:
    """The MLP as a trial builds it, He-initialized from ``seed``."""
    cfg = ModelConfig(
        depth=setup.depth, width=width, parametrization=setup.parametrization, base_width=setup.base_width
    )
    act = ActivationConfig(name=setup.activation)
    model = build_model(cfg, act, NormalizationConfig(), splits.input_shape, splits.num_classes)
    generator = torch.Generator().manual_seed(seed)
    apply_init(model, InitializerConfig(name="kaiming_normal"), 1.0, activation_gain(act), generator)
    return model


@torch.no_grad()
def _layer_outputs(model: Network, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every hidden block's output and the logits, read through the blocks' capture."""
    for block in model.blocks:
        block.capture = {}
    try:
        logits = model(x)
        outputs = {f"h{i}": block.capture["out"] for i, block in enumerate(model.blocks, start=1)}
    finally:
        for block in model.blocks:
            block.capture = None
    return {**outputs, "logits": logits}


def width_slope(rows: list[dict], layer: str, step: int, size: str = "l1") -> float:
    """The least-squares slope of log(``size``) against log(width), for one layer at one step."""
    points = [(math.log(r["width"]), math.log(r[size])) for r in rows if r["layer"] == layer and r["step"] == step]
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
