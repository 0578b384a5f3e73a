"""Models built from the registries: an MLP, a plain CNN (any depth), and where the others live.

Both are a stack of ``Block``s (layer -> normalization -> activation, optionally residual) and a
linear head. Diagnostics rely on that shape: ``model.blocks`` are the hidden layers, each with
``.layer`` (its pre-activation is the layer's output), ``.norm`` and ``.act``.

``MODELS`` maps a name to ``factory(model_cfg, activation_cfg, norm_cfg, input_shape, num_classes)``.
The recurrent models (``rnn``, ``gru``) live in ``recurrent.py``: their signal runs through time
steps rather than blocks, and they expose ``layers`` and ``recurrent = True`` instead. CIFAR
ResNets (``resnet``) live in ``resnet.py``: a ``Network`` whose blocks are residual blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ActivationConfig, ConfigError, ModelConfig, NormalizationConfig
from pipeline.config.catalog import MODELS, activation_widening
from pipeline.engine.nn.activations import build_activation
from pipeline.engine.nn.network import Block, Network
from pipeline.engine.nn.norms import build_norm
from pipeline.engine.optim import Scaling

ModelFactory = Callable[[ModelConfig, ActivationConfig, NormalizationConfig, tuple, int], nn.Module]

# MODELS (pipeline/config/catalog.py): each declared name is registered below.


@MODELS.register("mlp")
def build_mlp(
    cfg: ModelConfig, act: ActivationConfig, norm: NormalizationConfig, input_shape: tuple, num_classes: int
) -> Network:
    """``depth`` hidden layers of ``width`` units; residual links skip the width->width layers.

    ``cfg.parametrization`` ntk or mup tags every parameter with its ``Scaling`` (its per-layer
    learning rate: pipeline/engine/optim.py); muP's readout also multiplies its input by 1/sqrt(r).
    """
    in_features, wide = math.prod(input_shape), cfg.width * activation_widening(act)
    blocks = []
    for i in range(cfg.depth):
        fan_in = in_features if i == 0 else cfg.width
        linear = nn.Linear(fan_in, wide)  # (B, fan_in) -> (B, width * maxout pieces)
        blocks.append(Block(linear, build_norm(norm, wide), build_activation(act), cfg.residual and i > 0))
    r = cfg.width / cfg.base_width
    if cfg.parametrization == "mup":
        head = Readout(cfg.width, num_classes, r**-0.5)  # (B, width) -> (B, classes), input times 1/sqrt(r)
    else:
        head = nn.Linear(cfg.width, num_classes)
    network = Network(nn.Flatten(), blocks, nn.Identity(), head)
    if cfg.parametrization != "standard":
        tag_scalings(network, cfg.parametrization, r)
    return network


class Readout(nn.Linear):
    """A Linear layer whose input is multiplied by a fixed ``multiplier`` (bias unscaled).

    muP's output layer with multiplier 1/sqrt(r): its effective weights start with the
    initializer's variance / r (Tensor Programs V, Table 3), while the stored weights stay the
    initializer's draw, as every other layer's. (The ``mup`` package's ``MuReadout`` multiplies by
    1/r and stores weights sqrt(r) times larger: the same function, trained to the same steps.)
    """

    def __init__(self, in_features: int, out_features: int, multiplier: float) -> None:
        super().__init__(in_features, out_features)
        self.multiplier = multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x * self.multiplier, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, multiplier={self.multiplier:.4g}"


def tag_scalings(network: Network, parametrization: str, width_mult: float) -> None:
    """Set ``p.scaling`` on every parameter: its role (input, hidden, output, vector, fixed)."""

    def tag(p: nn.Parameter, role: str, fan_in: int = 1) -> None:
        p.scaling = Scaling(parametrization, role, width_mult, fan_in)

    for i, block in enumerate(network.blocks):
        tag(block.layer.weight, "input" if i == 0 else "hidden", block.layer.in_features)
        for p in [block.layer.bias, *block.norm.parameters()]:
            tag(p, "vector")  # (width,): one width dimension, as an input weight's
    tag(network.head.weight, "output", network.head.in_features)
    tag(network.head.bias, "fixed")  # (classes,): no width dimension


@MODELS.register("cnn")
def build_cnn(
    cfg: ModelConfig, act: ActivationConfig, norm: NormalizationConfig, input_shape: tuple, num_classes: int
) -> Network:
    """``depth`` conv blocks of ``channels``; every second block halves the length/size while it is >= 8.

    1-D inputs (C, L) get Conv1d, images (C, H, W) Conv2d; a global average pool feeds the head.
    """
    if len(input_shape) not in (2, 3):
        raise ConfigError(f"model=cnn needs (C, L) or (C, H, W) inputs, got shape {tuple(input_shape)}; use model=mlp")
    spatial_dims = len(input_shape) - 1
    conv = nn.Conv1d if spatial_dims == 1 else nn.Conv2d
    channels, size, blocks = input_shape[0], min(input_shape[1:]), []
    wide = cfg.channels * activation_widening(act)
    for i in range(cfg.depth):
        stride = 2 if i % 2 == 1 and size >= 8 else 1
        layer = conv(channels, wide, cfg.kernel_size, stride=stride, padding=cfg.kernel_size // 2)
        residual = cfg.residual and stride == 1 and channels == cfg.channels
        blocks.append(Block(layer, build_norm(norm, wide, spatial_dims), build_activation(act), residual))
        channels, size = cfg.channels, math.ceil(size / stride)
    pool = nn.Sequential(nn.AdaptiveAvgPool1d(1) if spatial_dims == 1 else nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Network(nn.Identity(), blocks, pool, nn.Linear(cfg.channels, num_classes))


from pipeline.engine.nn.recurrent import build_recurrent  # noqa: E402  (registered beside the others)
from pipeline.engine.nn.resnet import build_resnet  # noqa: E402

MODELS.add("rnn", build_recurrent("rnn"))
MODELS.add("gru", build_recurrent("gru"))
MODELS.add("resnet", build_resnet)


def build_model(
    cfg: ModelConfig, act: ActivationConfig, norm: NormalizationConfig, input_shape: tuple, num_classes: int
) -> nn.Module:
    return MODELS.get(cfg.name)(cfg, act, norm, tuple(input_shape), num_classes)
