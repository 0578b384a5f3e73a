"""Optimizers: ``OPTIMIZERS`` maps ``optimizer.name`` to a factory ``(params, OptimizerConfig)``
(the element-wise ones that trial batching uses, SGD and Adam, also take ``fused=True``).

SGD is the default on purpose: Adam rescales gradients and hides vanishing signals
(under SGD a vanishing gradient shows as a vanishing update). LARS (You et al. 2017) gives each layer a learning rate proportional to
``||w|| / ||grad||``, for networks whose layers' gradients differ by orders of magnitude.

None of them is a ``torch.optim.Optimizer``: its constructor imports ``torch._dynamo`` (for
``torch.compile``, which trials do not use), about 1.2 s of CPU in every process that trains, a
fifth of a Ray worker's start-up. SGD and Adam here hold the same state as ``torch.optim.SGD`` and
``torch.optim.Adam`` and call the same functional update their ``step`` calls
(``torch.optim.sgd.sgd``, ``torch.optim.adam.adam``): the same numbers, bit for bit
(tests/engine/test_optim.py steps both side by side).

A parametrization other than standard (``model.parametrization``: ntk, mup) gives each parameter
its own learning rate and weight decay: the model tags each parameter with its ``Scaling`` (as the
``mup`` package tags ``p.infshape``), and SGD and Adam step each group of equal factors with its
own ``lr`` and ``weight_decay``, as ``torch.optim`` steps its param groups.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple, Optional

import torch
from torch.optim.adam import adam as adam_update
from torch.optim.sgd import sgd as sgd_update

from pipeline.config import OptimizerConfig
from pipeline.config.catalog import OPTIMIZERS


class Scaling(NamedTuple):
    """What a parametrization knows of one parameter, set on it as ``p.scaling`` by the model.

    ``role``: ``input``, ``hidden`` or ``output`` (a layer's weight), ``vector`` (a bias or norm
    scale of the width's size) or ``fixed`` (a bias of the classes' size). ``width_mult``: r =
    width / base_width (muP). ``fan_in``: the layer's (NTK).
    """

    parametrization: str
    role: str
    width_mult: float = 1.0
    fan_in: int = 1


def scaled_rates(scaling: Optional[Scaling], optimizer: str) -> tuple[float, float]:
    """(learning-rate factor, weight-decay factor) of a parameter, for ``optimizer`` sgd or adam.

    The stored weights are the ones the forward pass uses, as the initializer set them; so NTK is
    its per-layer rates (N(0, 1) weights times 1/sqrt(fan_in) in the forward, trained at lr, move
    the effective weights at lr / fan_in under SGD, lr / sqrt(fan_in) under Adam, whose update
    ignores the gradient's scale), and muP is the ``mup`` package's MuSGD / MuAdam, with its
    readout's multiplier 1/r on weights r^(1/2) larger taken as 1/sqrt(r) on the initializer's
    (the readout's rates move by r and r^(1/2): the same steps, tests/engine/test_mup.py).
    """
    if scaling is None or scaling.parametrization == "standard":
        return 1.0, 1.0
    if scaling.parametrization == "ntk":
        return _ntk_rates(scaling, optimizer)
    return _mup_rates(scaling, optimizer)


def _ntk_rates(scaling: Scaling, optimizer: str) -> tuple[float, float]:
    if scaling.role not in ("input", "hidden", "output"):
        return 1.0, 1.0  # biases and norm scales keep multiplier 1 (Jacot et al. 2018)
    n = scaling.fan_in
    # Weight decay on the N(0, 1) weights is decay times n on the effective ones, under either optimizer.
    return (1.0 / n if optimizer == "sgd" else 1.0 / math.sqrt(n)), float(n)


def _mup_rates(scaling: Scaling, optimizer: str) -> tuple[float, float]:
    r = scaling.width_mult
    if optimizer == "sgd":  # MuSGD: vector-like (one width dimension) lr x r, decay / r
        return (r, 1.0 / r) if scaling.role in ("input", "vector") else (1.0, 1.0)
    if scaling.role == "hidden":  # MuAdam: matrix-like (two width dimensions) lr / r, decay x r
        return 1.0 / r, r
    return (1.0 / math.sqrt(r), r) if scaling.role == "output" else (1.0, 1.0)


def rate_groups(
    params: list[torch.Tensor], optimizer: str, lr: float, weight_decay: float
) -> list[tuple[list[torch.Tensor], float, float]]:
    """``params`` grouped by their scaled (lr, weight_decay), in order of first appearance."""
    groups: dict[tuple[float, float], list[torch.Tensor]] = {}
    for p in params:
        lr_factor, decay_factor = scaled_rates(getattr(p, "scaling", None), optimizer)
        groups.setdefault((lr * lr_factor, weight_decay * decay_factor), []).append(p)
    return [(members, group_lr, group_decay) for (group_lr, group_decay), members in groups.items()]


class Optimizer:
    """What the trial engine asks of an optimizer: ``zero_grad`` and ``step``, over ``params``."""

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        self.params = list(params)
        self.state: dict[torch.Tensor, dict] = {}  # per parameter, created at its first step

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    def step(self) -> None:
        raise NotImplementedError

    def _with_grads(self, params: Optional[list[torch.Tensor]] = None) -> list[torch.Tensor]:
        # As torch.optim: a parameter without a gradient (unused this step) is not updated.
        return [p for p in (self.params if params is None else params) if p.grad is not None]


class SGD(Optimizer):
    """``torch.optim.SGD(params, lr, momentum, weight_decay=..., fused=...)`` (no dampening, no Nesterov)."""

    def __init__(
        self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, fused: Optional[bool] = None
    ) -> None:
        super().__init__(params)
        self.lr, self.momentum, self.weight_decay, self.fused = lr, momentum, weight_decay, fused
        self.groups = rate_groups(self.params, "sgd", lr, weight_decay)

    @torch.no_grad()
    def step(self) -> None:
        for group, lr, weight_decay in self.groups:
            self._step(self._with_grads(group), lr, weight_decay)

    def _step(self, params: list[torch.Tensor], lr: float, weight_decay: float) -> None:
        buffers = [self.state.get(p, {}).get("momentum_buffer") for p in params] if self.momentum else []
        sgd_update(
            params,
            [p.grad for p in params],
            buffers,
            fused=self.fused,
            weight_decay=weight_decay,
            momentum=self.momentum,
            lr=lr,
            dampening=0.0,
            nesterov=False,
            maximize=False,
        )
        for p, buffer in zip(params, buffers):  # the first step made them
            self.state[p] = {"momentum_buffer": buffer}


class Adam(Optimizer):
    """``torch.optim.Adam(params, lr, betas, weight_decay=..., fused=...)`` (eps 1e-8, no AMSGrad)."""

    def __init__(
        self,
        params,
        lr: float,
        betas: tuple[float, float],
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        fused: Optional[bool] = None,
    ) -> None:
        super().__init__(params)
        self.lr, self.betas, self.weight_decay, self.eps, self.fused = lr, betas, weight_decay, eps, fused
        self.groups = rate_groups(self.params, "adam", lr, weight_decay)

    @torch.no_grad()
    def step(self) -> None:
        for group, lr, weight_decay in self.groups:
            self._step(self._with_grads(group), lr, weight_decay)

    def _step(self, params: list[torch.Tensor], lr: float, weight_decay: float) -> None:
        for p in params:
            if p not in self.state:
                self.state[p] = self._new_state(p)
        states = [self.state[p] for p in params]
        adam_update(
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            [s["step"] for s in states],
            fused=self.fused,
            has_complex=any(torch.is_complex(p) for p in params),
            amsgrad=False,
            beta1=self.betas[0],
            beta2=self.betas[1],
            lr=lr,
            weight_decay=weight_decay,
            eps=self.eps,
            maximize=False,
        )

    def _new_state(self, p: torch.Tensor) -> dict:
        # torch.optim.Adam's: the step count is a float32 tensor on the parameter's device when
        # fused, else a CPU scalar tensor of the default float type.
        if self.fused:
            step = torch.zeros((), dtype=torch.float32, device=p.device)
        else:
            step = torch.tensor(
                0.0, dtype=torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
            )
        return {
            "step": step,
            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
        }


# OPTIMIZERS (pipeline/config/catalog.py): each declared name is registered below.


class LARS(Optimizer):
    """Layer-wise Adaptive Rate Scaling, the update rule of You, Gitman & Ginsburg (2017), Alg. 1.

    For every parameter tensor w with gradient g (one "layer"):
        local_lr = trust_coefficient * ||w|| / (||g|| + weight_decay * ||w||)
        v <- momentum * v + lr * local_lr * (g + weight_decay * w)
        w <- w - v
    Tensors of one dimension (biases, normalization scales) skip the adaptation (local_lr = 1),
    as is customary (``adapt_vectors=True`` adapts them too). Where ||w|| or ||g|| is zero the
    local rate is 1, so a zero-initialized layer still moves.
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        adapt_vectors: bool = False,
    ) -> None:
        super().__init__(params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.trust_coefficient, self.adapt_vectors = trust_coefficient, adapt_vectors

    @torch.no_grad()
    def step(self) -> None:
        for w in self._with_grads():
            self._update(w)

    def _update(self, w: torch.Tensor) -> None:
        g = w.grad
        local_lr = self._local_lr(w, g) if (w.dim() > 1 or self.adapt_vectors) else 1.0
        update = g.add(w, alpha=self.weight_decay) if self.weight_decay else g.clone()
        update.mul_(self.lr * local_lr)
        state = self.state.setdefault(w, {})
        velocity = state.get("velocity")
        if velocity is None:
            velocity = state["velocity"] = update
        else:
            velocity.mul_(self.momentum).add_(update)
        w.sub_(velocity)

    def _local_lr(self, w: torch.Tensor, g: torch.Tensor):
        w_norm, g_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(g)
        ratio = self.trust_coefficient * w_norm / (g_norm + self.weight_decay * w_norm)
        return torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))


@OPTIMIZERS.register("sgd")
def _sgd(params, cfg: OptimizerConfig, fused: bool = False) -> Optimizer:
    return SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused or None)


@OPTIMIZERS.register("adam")
def _adam(params, cfg: OptimizerConfig, fused: bool = False) -> Optimizer:
    return Adam(params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay, fused=fused or None)


@OPTIMIZERS.register("lars")
def _lars(params, cfg: OptimizerConfig) -> Optimizer:
    return LARS(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, trust_coefficient=cfg.trust_coefficient
    )


def build_optimizer(params, cfg: OptimizerConfig, fused: bool = False) -> Optimizer:
    """``fused``: one kernel per step for all parameters (SGD, Adam), the same update rounded
    differently: trial batching uses it (its stacked tensors made the step memory-bound: 1.5 ->
    0.9 ms at 32 members); a trial alone keeps the default, so its recorded runs replay bit for bit."""
    factory = OPTIMIZERS.get(cfg.name)
    return factory(params, cfg, fused=True) if fused else factory(params, cfg)
