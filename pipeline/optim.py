"""Optimizers: ``OPTIMIZERS`` maps ``optimizer.name`` to a factory ``(params, OptimizerConfig)``
(the element-wise ones that trial batching uses, SGD and Adam, also take ``fused=True``).

SGD is the default on purpose: Adam rescales gradients and hides vanishing signals
(shared/SCIENCE.md s4). LARS (You et al. 2017) gives each layer a learning rate proportional to
``||w|| / ||grad||``, for networks whose layers' gradients differ by orders of magnitude.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from pipeline.config import OptimizerConfig
from pipeline.registry import Registry

OPTIMIZERS: Registry[Callable[[Iterable, OptimizerConfig], torch.optim.Optimizer]] = Registry("optimizer")


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling, the update rule of You, Gitman & Ginsburg (2017), Alg. 1.

    For every parameter tensor w with gradient g (one "layer"):
        local_lr = trust_coefficient * ||w|| / (||g|| + weight_decay * ||w||)
        v <- momentum * v + lr * local_lr * (g + weight_decay * w)
        w <- w - v
    Tensors of one dimension (biases, normalization scales) skip the adaptation (local_lr = 1),
    as is customary (``adapt_vectors=True`` adapts them too). Where ||w|| or ||g|| is zero the
    local rate is 1, so a zero-initialized layer still moves.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, adapt_vectors: bool = False) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, adapt_vectors=adapt_vectors)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for w in group["params"]:
                if w.grad is not None:
                    self._update(w, group)
        return loss

    def _update(self, w: torch.Tensor, group: dict) -> None:
        g = w.grad
        local_lr = self._local_lr(w, g, group) if (w.dim() > 1 or group["adapt_vectors"]) else 1.0
        update = g.add(w, alpha=group["weight_decay"]) if group["weight_decay"] else g.clone()
        update.mul_(group["lr"] * local_lr)
        state = self.state[w]
        velocity = state.get("velocity")
        if velocity is None:
            velocity = state["velocity"] = update
        else:
            velocity.mul_(group["momentum"]).add_(update)
        w.sub_(velocity)

    @staticmethod
    def _local_lr(w: torch.Tensor, g: torch.Tensor, group: dict):
        w_norm, g_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(g)
        ratio = group["trust_coefficient"] * w_norm / (g_norm + group["weight_decay"] * w_norm)
        return torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))


@OPTIMIZERS.register("sgd")
def _sgd(params, cfg: OptimizerConfig, fused: bool = False) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused or None)


@OPTIMIZERS.register("adam")
def _adam(params, cfg: OptimizerConfig, fused: bool = False) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay,
                            fused=fused or None)


@OPTIMIZERS.register("lars")
def _lars(params, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    return LARS(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                trust_coefficient=cfg.trust_coefficient)


def build_optimizer(params, cfg: OptimizerConfig, fused: bool = False) -> torch.optim.Optimizer:
    """``fused``: one kernel per step for all parameters (SGD, Adam), the same update rounded
    differently: trial batching uses it (its stacked tensors made the step memory-bound: 1.5 ->
    0.9 ms at 32 members); a trial alone keeps the default, so its recorded runs replay bit for bit."""
    factory = OPTIMIZERS.get(cfg.name)
    return factory(params, cfg, fused=True) if fused else factory(params, cfg)
