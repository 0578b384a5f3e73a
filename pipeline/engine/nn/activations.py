"""Activation functions, each with the initialization gain it implies.

``ACTIVATIONS`` maps a name to an ``Activation``: a module factory, a gain and, for bounded
functions, a test of which outputs count as saturated.

Gain: where ``torch.nn.init.calculate_gain`` defines one (identity, sigmoid, tanh, relu,
leaky_relu, selu) we use it unchanged, so ``kaiming_normal`` equals PyTorch's. For the others
(elu, relu6, gelu, silu, softplus: PyTorch raises ``ValueError``) the gain is the one that keeps
the second moment through the layer, g = 1/sqrt(E[phi(z)^2]) for z ~ N(0, 1), computed by
Gauss-Hermite quadrature (docs/initializers.md lists the values). Maxout's gain follows the
same rule for the max of ``pieces`` Gaussians (``maxout_gain``: 1.0 for 2 pieces, 0.80 for 4).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from pipeline.config import ActivationConfig
from pipeline.config.catalog import ACTIVATIONS


@dataclass(frozen=True)
class Activation:
    build: Callable[[ActivationConfig], nn.Module]
    gain: Callable[[ActivationConfig], float]
    saturated: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # bool mask of outputs
    # How much wider the layer before it is (maxout's pieces): ``catalog.activation_widening``.


class Maxout(nn.Module):
    """Goodfellow et al. 2013: the max over ``pieces`` consecutive features (channels).

    (B, C * pieces, *positions) -> (B, C, *positions); the layer before it is ``pieces`` times wider.
    """

    def __init__(self, pieces: int) -> None:
        super().__init__()
        self.pieces = pieces

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = 1 if x.dim() > 1 else 0  # features: dim 1 of a batch, dim 0 of a single vector
        grouped = x.unflatten(dim, (x.shape[dim] // self.pieces, self.pieces))
        return grouped.max(dim=dim + 1).values


def maxout_gain(pieces: int) -> float:
    """1/sqrt(E[max(z_1..z_k)^2]) for iid z ~ N(0, 1): the max's density is k phi(x) Phi(x)^(k-1).

    k=1 gives 1 (linear), k=2 gives exactly 1 as well (E[max^2] = 1), larger k slightly less than 1:
    the max of more Gaussians has a larger second moment, so the weights must shrink a little.
    """
    x = torch.linspace(-12, 12, 48001, dtype=torch.float64)
    phi = torch.exp(-(x**2) / 2) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    density = pieces * phi * cdf ** (pieces - 1)
    moment = float(torch.trapezoid(x**2 * density, x))
    return 1.0 / math.sqrt(moment)


# ACTIVATIONS (pipeline/config/catalog.py) maps each declared name to its ``Activation``, registered below.


def second_moment_gain(fn: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """g such that g^2 * E[phi(z)^2] = 1 for z ~ N(0, 1)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(200)  # weight exp(-z^2/2)
    values = fn(torch.tensor(nodes, dtype=torch.float64)).numpy()
    moment = float(np.sum(weights * values**2) / math.sqrt(2 * math.pi))
    return 1.0 / math.sqrt(moment)


def _torch_gain(name: str) -> Callable[[ActivationConfig], float]:
    return lambda cfg: nn.init.calculate_gain(name, cfg.slope if name == "leaky_relu" else None)


def _moment_gain(module: nn.Module) -> Callable[[ActivationConfig], float]:
    gain = second_moment_gain(module)
    return lambda cfg: gain


def _tanh_saturated(h: torch.Tensor) -> torch.Tensor:
    return h.abs() > 0.99


def _sigmoid_saturated(h: torch.Tensor) -> torch.Tensor:
    return (h < 0.01) | (h > 0.99)


ACTIVATIONS.add("identity", Activation(lambda c: nn.Identity(), _torch_gain("linear")), "linear")
ACTIVATIONS.add("sigmoid", Activation(lambda c: nn.Sigmoid(), _torch_gain("sigmoid"), _sigmoid_saturated))
ACTIVATIONS.add("tanh", Activation(lambda c: nn.Tanh(), _torch_gain("tanh"), _tanh_saturated))
ACTIVATIONS.add("relu", Activation(lambda c: nn.ReLU(), _torch_gain("relu")))
ACTIVATIONS.add("leaky_relu", Activation(lambda c: nn.LeakyReLU(c.slope), _torch_gain("leaky_relu")))
ACTIVATIONS.add("selu", Activation(lambda c: nn.SELU(), _torch_gain("selu")))
ACTIVATIONS.add("elu", Activation(lambda c: nn.ELU(), _moment_gain(nn.ELU())))
ACTIVATIONS.add("relu6", Activation(lambda c: nn.ReLU6(), _moment_gain(nn.ReLU6())))
ACTIVATIONS.add("gelu", Activation(lambda c: nn.GELU(), _moment_gain(nn.GELU())))
ACTIVATIONS.add("silu", Activation(lambda c: nn.SiLU(), _moment_gain(nn.SiLU())), "swish")
ACTIVATIONS.add("softplus", Activation(lambda c: nn.Softplus(), _moment_gain(nn.Softplus())))
ACTIVATIONS.add("maxout", Activation(lambda c: Maxout(c.pieces), lambda c: maxout_gain(c.pieces)))


def build_activation(cfg: ActivationConfig) -> nn.Module:
    return ACTIVATIONS.get(cfg.name).build(cfg)


def activation_gain(cfg: ActivationConfig) -> float:
    """The gain ``initializer.gain=auto`` resolves to for this activation."""
    return ACTIVATIONS.get(cfg.name).gain(cfg)
