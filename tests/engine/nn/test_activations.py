"""Activations: every entry finite forward and backward; gains against torch and SCIENCE.md."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.config import ActivationConfig
from pipeline.config.catalog import activation_widening
from pipeline.config.composition import compose
from pipeline.engine.nn.activations import ACTIVATIONS, activation_gain, build_activation

# Where torch.nn.init.calculate_gain defines the gain, ours must equal it: (our name, slope, torch's).
TORCH_GAINS = [
    ("identity", 0.01, ("linear", None)),
    ("sigmoid", 0.01, ("sigmoid", None)),
    ("tanh", 0.01, ("tanh", None)),
    ("relu", 0.01, ("relu", None)),
    ("leaky_relu", 0.01, ("leaky_relu", 0.01)),
    ("leaky_relu", 0.2, ("leaky_relu", 0.2)),
    ("selu", 0.01, ("selu", None)),
]
# Gains g with g^2 E[phi(z)^2] = 1, z ~ N(0, 1), measured by quadrature (SCIENCE.md section 1).
SCIENCE_GAINS = {"elu": 1.2452, "gelu": 1.5335, "silu": 1.6765, "relu6": 1.414}
MOMENT_GAINED = ["elu", "gelu", "silu", "relu6", "softplus"]  # torch's calculate_gain raises for these


def gain(name: str, slope: float = 0.01) -> float:
    return activation_gain(ActivationConfig(name=name, slope=slope))


@pytest.mark.parametrize("name, slope, torch_args", TORCH_GAINS, ids=lambda v: str(v))
def test_gain_equals_torch_where_torch_defines_it(name, slope, torch_args):
    assert gain(name, slope) == nn.init.calculate_gain(*torch_args)


@pytest.mark.parametrize("name", MOMENT_GAINED)
def test_torch_has_no_gain_for_these(name):
    with pytest.raises(ValueError):
        nn.init.calculate_gain(name)


@pytest.mark.parametrize("name, expected", SCIENCE_GAINS.items())
def test_gain_matches_the_quadrature_values(name, expected):
    assert gain(name) == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("name", MOMENT_GAINED)
def test_gain_keeps_the_second_moment_monte_carlo(name):
    z = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    phi = build_activation(ActivationConfig(name=name)).double()
    assert gain(name) ** 2 * phi(z).pow(2).mean().item() == pytest.approx(1.0, rel=0.01)


def test_aliases_share_the_gain():
    assert gain("swish") == gain("silu") and gain("linear") == gain("identity")


@pytest.mark.parametrize("name", ACTIVATIONS.names(aliases=True))
def test_every_activation_is_finite_forward_and_backward(name):
    # Ordinary values plus extremes where naive formulas overflow (softplus, silu, sigmoid, elu).
    x = torch.cat([torch.randn(256, generator=torch.Generator().manual_seed(0)) * 3, torch.tensor([-80.0, 80.0])])
    x.requires_grad_(True)
    cfg = ActivationConfig(name=name)
    y = build_activation(cfg)(x)
    y.pow(2).sum().backward()
    assert y.shape[0] * activation_widening(cfg) == x.shape[0]  # maxout: pieces in per unit out
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", [n for n in ACTIVATIONS.names() if ACTIVATIONS.get(n).saturated])
def test_saturation_masks_flag_the_flat_ends(name):
    h = build_activation(ActivationConfig(name=name))(torch.tensor([-10.0, 0.1, 10.0]))
    assert ACTIVATIONS.get(name).saturated(h).tolist() == [True, False, True]


def test_leaky_relu_yaml_sets_the_slope():
    assert compose(["activation=leaky_relu"])["activation"]["slope"] == 0.01
