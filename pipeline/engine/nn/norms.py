"""Normalization layers. "none" is a real entry (``nn.Identity``), so models have no branches.

Each entry builds a layer for ``num_features`` channels of a dense (``spatial_dims=0``) or
convolutional (1 or 2 spatial dims) layer output.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from pipeline.config import ConfigError, NormalizationConfig
from pipeline.config.catalog import NORMALIZATIONS

NormFactory = Callable[[NormalizationConfig, int, int], nn.Module]

# NORMALIZATIONS (pipeline/config/catalog.py): each declared name is registered below.


@NORMALIZATIONS.register("none")
def _none(cfg: NormalizationConfig, num_features: int, spatial_dims: int) -> nn.Module:
    return nn.Identity()


@NORMALIZATIONS.register("batch")
def _batch(cfg: NormalizationConfig, num_features: int, spatial_dims: int) -> nn.Module:
    return nn.BatchNorm2d(num_features) if spatial_dims == 2 else nn.BatchNorm1d(num_features)


@NORMALIZATIONS.register("layer")
def _layer(cfg: NormalizationConfig, num_features: int, spatial_dims: int) -> nn.Module:
    # Over a conv output, layer norm normalizes each sample over all channels and positions.
    return nn.LayerNorm(num_features) if spatial_dims == 0 else nn.GroupNorm(1, num_features)


@NORMALIZATIONS.register("group")
def _group(cfg: NormalizationConfig, num_features: int, spatial_dims: int) -> nn.Module:
    if num_features % cfg.groups:
        raise ConfigError(
            f"normalization.groups={cfg.groups} does not divide {num_features} features; "
            "choose a divisor of the layer width/channels"
        )
    return nn.GroupNorm(cfg.groups, num_features)


def build_norm(cfg: NormalizationConfig, num_features: int, spatial_dims: int = 0) -> nn.Module:
    return NORMALIZATIONS.get(cfg.name)(cfg, num_features, spatial_dims)
