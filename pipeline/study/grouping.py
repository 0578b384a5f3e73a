"""Which trials can train together, and what a task costs: the driver's side of trial batching.

Two trials with the same ``batch_key`` differ only in what each member keeps for itself, and
train as one vectorized model on a worker (pipeline/engine/batched.py). ``task_cost`` orders a study's
tasks, costliest first. Nothing here imports PyTorch: a study's driver never does.
"""

from __future__ import annotations

import json
from typing import Optional

from pipeline.config import ActivationConfig
from pipeline.config.catalog import activation_widening

#: Optimizers whose update of each element depends only on that element's own history, so a sum
#: of the members' losses gives each member its own update (LARS's per-tensor norms would mix them).
ELEMENTWISE_OPTIMIZERS = ("sgd", "adam")

#: What each member of a batch keeps for itself; everything else must be equal. The activation
#: too, but for how much it widens the layer before it (maxout's pieces), which is the shape's.
_OWN_KEYS = ("initializer", "scale", "seed", "activation", "tracking", "study", "space", "cluster")


def batch_key(config: dict) -> Optional[str]:
    """A key shared by the trials that can train together with this one; None: it trains alone."""
    if not _batchable(config):
        return None
    shared = {key: value for key, value in config.items() if key not in _OWN_KEYS}
    shared["activation_widening"] = activation_widening(ActivationConfig(**config["activation"]))
    return json.dumps(shared, sort_keys=True, default=str)


#: A training step's fixed cost (kernel launches, the optimizer's step, the batch's gather) in
#: samples' worth of one member's arithmetic at width 128: measured on 2 CPUs, MLP 4x128 on digits.
STEP_COST_SAMPLES = 90
#: Normalization about doubles a step's fixed cost (a member's arithmetic grows by under 10%).
NORM_STEP_COST = 2.0


def task_cost(configs: list[dict]) -> float:
    """A task's cost relative to other tasks of the same study (same dataset), for ordering only.

    Per epoch and hidden layer, a member's arithmetic grows with the samples times width^2, and
    each step adds a fixed cost whatever the number of members (doubled by normalization): with n
    training samples, cost is proportional to n * (members * (width/128)^2 + step / batch_size).
    n is the same for every task of a study (one dataset), so it is left out. On 2 CPUs this is
    within 25% of the measured times of batches of 1 to 10 members, batch sizes 32 to 128, with
    and without batch norm (tests/engine/test_batched.py).
    """
    config = configs[0]
    model, train = config["model"], config["train"]
    step = STEP_COST_SAMPLES * (1.0 if config["normalization"]["name"] == "none" else NORM_STEP_COST)
    per_sample = len(configs) * (model.get("width", 128) / 128) ** 2 + step / config["batch_size"]
    return train["epochs"] * max(1, model.get("depth", 1)) * per_sample


def _batchable(config: dict) -> bool:
    return (
        config["model"]["name"] == "mlp"
        # ntk/mup: per-layer learning rates and muP's readout multiplier, which StackedMLP has not
        and config["model"].get("parametrization", "standard") == "standard"
        and config["optimizer"]["name"] in ELEMENTWISE_OPTIMIZERS
        and config["train"].get("grad_clip") is None  # a global norm per member: not element-wise
        and not config["dataset"].get("augment")  # each trial's crops and flips come from its own seed
    )
