"""Normalizations: every entry finite forward and backward, normalizing over the right axes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.config import ConfigError, NormalizationConfig
from pipeline.config.composition import compose
from pipeline.engine.nn.norms import NORMALIZATIONS, build_norm

BATCH, FEATURES, GROUPS = 8, 16, 8
SHAPES = {0: (BATCH, FEATURES), 1: (BATCH, FEATURES, 10), 2: (BATCH, FEATURES, 6, 6)}  # by spatial_dims


def norm(name: str, spatial_dims: int, groups: int = GROUPS) -> nn.Module:
    return build_norm(NormalizationConfig(name=name, groups=groups), FEATURES, spatial_dims)


def sample(spatial_dims: int) -> torch.Tensor:
    # Off-centre and wide, so an output that is not normalized shows.
    x = torch.randn(SHAPES[spatial_dims], generator=torch.Generator().manual_seed(0))
    return (x * 5 + 3).requires_grad_(True)


@pytest.mark.parametrize("spatial_dims", [0, 1, 2])
@pytest.mark.parametrize("name", NORMALIZATIONS.names())
def test_every_norm_is_finite_forward_and_backward(name, spatial_dims):
    x = sample(spatial_dims)
    y = norm(name, spatial_dims).train()(x)
    (y * torch.randn_like(y)).sum().backward()
    assert y.shape == x.shape
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


# The axes each norm averages over, as (dims reduced) for an input shaped (B, C, *spatial).
def reduced_axes(name: str, spatial_dims: int) -> tuple[int, ...]:
    spatial = tuple(range(2, 2 + spatial_dims))
    return {"batch": (0, *spatial), "layer": (1, *spatial)}[name]


@pytest.mark.parametrize("spatial_dims", [0, 1, 2])
@pytest.mark.parametrize("name", ["batch", "layer"])
def test_batch_and_layer_norm_normalize_their_axes(name, spatial_dims):
    y = norm(name, spatial_dims).train()(sample(spatial_dims)).detach()
    axes = reduced_axes(name, spatial_dims)
    assert torch.allclose(y.mean(axes), torch.zeros(()), atol=1e-5)
    assert torch.allclose(y.var(axes, unbiased=False), torch.ones(()), atol=1e-3)


@pytest.mark.parametrize("spatial_dims", [0, 1, 2])
def test_group_norm_normalizes_each_group_of_each_sample(spatial_dims):
    x = sample(spatial_dims).detach()
    grouped = x.reshape(BATCH, GROUPS, -1)  # (B, C, *spatial) -> (B, groups, C/groups * positions)
    mean, var = grouped.mean(-1, keepdim=True), grouped.var(-1, unbiased=False, keepdim=True)
    expected = ((grouped - mean) / torch.sqrt(var + 1e-5)).reshape(x.shape)  # eps as nn.GroupNorm
    assert torch.allclose(norm("group", spatial_dims)(x), expected, atol=1e-5)


def test_none_is_the_identity():
    x = sample(2)
    assert isinstance(norm("none", 2), nn.Identity) and norm("none", 2)(x) is x


def test_group_norm_refuses_groups_that_do_not_divide_the_features():
    with pytest.raises(ConfigError, match="normalization.groups=5 does not divide 16 features"):
        norm("group", 0, groups=5)


def test_group_yaml_sets_eight_groups():
    assert compose(["normalization=group"])["normalization"]["groups"] == 8
