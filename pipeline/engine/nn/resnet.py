"""CIFAR ResNets (He et al. 2016, section 4.2) and the initializers made for residual networks.

Depth 6n+2: a 3x3 stem conv, three stages of n basic blocks at 16, 32 and 64 channels (times
``model.width_multiplier``), strides 1, 2, 2, a global average pool and a linear head. Shortcuts
are the paper's option A (parameter-free: subsample, pad the new channels with zeros), so the
parameter counts are the paper's: ResNet-20 0.27 M, ResNet-56 0.85 M, ResNet-110 1.7 M.

A block computes ``act(shortcut(x) + alpha * branch(x))`` with ``branch = norm2(conv2(act(norm1(conv1(x)))))``.
``model.residual_init`` chooses how a block starts, after the registry's initializer has set
every conv and linear weight (``initialize_residual``):

- ``none``: as the initializer left it.
- ``zero_gamma`` (Goyal et al. 2017): the scale of each branch's last normalization at zero, so
  every block starts as its shortcut. Needs a normalization with a scale (batch, layer, group).
- ``fixup`` (Zhang et al. 2019): each branch's first conv rescaled by L^(-1/(2m-2)) = L^(-1/2)
  (L blocks, m = 2 layers a branch), its last conv and the classifier at zero, a scalar bias
  before each conv and activation and a scalar multiplier after the branch (0, 0, 0, 0 and 1).
- ``skipinit`` (De & Smith 2020): a learnable scalar ``alpha`` at zero on each branch.

With fixup and skipinit every block computes its shortcut at init, whatever the weights (the
input of each block is a ReLU's output, which the final ReLU leaves as it is).

Diagnostics see the stem and every block as ``model.blocks``: a block's ``pre_act`` is the residual
stream before its final activation (so ``grad_norm`` is the backprop signal along the stream), and
its ``layer`` is its first conv (whose weight the update ratios follow).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ActivationConfig, ConfigError, ModelConfig, NormalizationConfig
from pipeline.config.catalog import RESIDUAL_INITS
from pipeline.engine.nn.activations import build_activation
from pipeline.engine.nn.network import Block, Network
from pipeline.engine.nn.norms import build_norm

#: Channels of the three stages at width multiplier 1 (He et al. 2016, CIFAR).
STAGE_CHANNELS = (16, 32, 64)


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    # No bias: a normalization follows, or (fixup) its scalar biases stand in.
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class ShortcutA(nn.Module):
    """Option A: keep every ``stride``-th position and pad the added channels with zeros."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, c_out - c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            x = F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return x


class BasicBlock(nn.Module):
    """Two 3x3 convs on the branch, a parameter-free shortcut; see the module docstring."""

    def __init__(
        self, c_in: int, c_out: int, stride: int, act: ActivationConfig, norm: NormalizationConfig, residual_init: str
    ) -> None:
        super().__init__()
        self.conv1, self.norm1, self.act1 = (
            conv3x3(c_in, c_out, stride),
            build_norm(norm, c_out, 2),
            build_activation(act),
        )
        self.conv2, self.norm2 = conv3x3(c_out, c_out), build_norm(norm, c_out, 2)
        self.act = build_activation(act)
        self.shortcut = ShortcutA(c_in, c_out, stride)
        self.layer = self.conv1  # the diagnostics' handle on the block
        self.fixup = residual_init == "fixup"
        if self.fixup:
            self.biases = nn.Parameter(torch.zeros(4))  # before conv1, act1, conv2, and after the branch
            self.multiplier = nn.Parameter(torch.ones(()))
        self.alpha = nn.Parameter(torch.zeros(())) if residual_init == "skipinit" else None
        self.capture: Optional[dict] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixup:
            x = x + self.biases[0]  # Fixup's code shifts the shortcut's input too
        stream = self.shortcut(x) + self._branch(x)
        out = self.act(stream)
        if self.capture is not None:
            self.capture.update(pre_act=stream, act_in=stream.detach(), out=out.detach())
        return out

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(self.conv1(x))
        if self.fixup:
            return (
                self.norm2(self.conv2(self.act1(h + self.biases[1]) + self.biases[2])) * self.multiplier
                + self.biases[3]
            )
        h = self.norm2(self.conv2(self.act1(h)))
        return h if self.alpha is None else self.alpha * h


def check_resnet(cfg: ModelConfig, norm: NormalizationConfig) -> int:
    """Blocks per stage n of a depth-6n+2 ResNet; refuses a depth or residual init that cannot be built."""
    if cfg.depth < 8 or (cfg.depth - 2) % 6:
        raise ConfigError(
            f"model.depth={cfg.depth} is invalid for model=resnet: CIFAR ResNets have depth 6n+2 "
            "(8, 14, 20, 32, 44, 56, 110, ...)"
        )
    if cfg.residual_init == "zero_gamma" and norm.name == "none":
        raise ConfigError(
            "model.residual_init=zero_gamma zeroes each branch's last normalization scale and needs one: "
            "normalization=batch|layer|group, or residual_init=fixup|skipinit without normalization"
        )
    return (cfg.depth - 2) // 6


def build_resnet(
    cfg: ModelConfig, act: ActivationConfig, norm: NormalizationConfig, input_shape: tuple, num_classes: int
) -> nn.Module:
    """A CIFAR ResNet of depth 6n+2 for (C, H, W) images."""
    if len(input_shape) != 3:
        raise ConfigError(f"model=resnet needs (C, H, W) images, got inputs of shape {tuple(input_shape)}")
    n = check_resnet(cfg, norm)
    widths = [max(1, round(c * cfg.width_multiplier)) for c in STAGE_CHANNELS]
    stem = Block(conv3x3(input_shape[0], widths[0]), build_norm(norm, widths[0], 2), build_activation(act), False)
    blocks, c_in = [stem], widths[0]
    for stage, c_out in enumerate(widths):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            blocks.append(BasicBlock(c_in, c_out, stride, act, norm, cfg.residual_init))
            c_in = c_out
    pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = Network(nn.Identity(), blocks, pool, nn.Linear(c_in, num_classes))
    model.residual_init = cfg.residual_init
    return model


def initialize_residual(model: nn.Module) -> None:
    """Apply the model's ``residual_init`` on top of the weights the initializer set (see the module
    docstring); models without residual blocks are left as they are."""
    kind = getattr(model, "residual_init", "none")
    if kind not in RESIDUAL_INITS:
        raise ConfigError(f"model.residual_init={kind!r} is invalid; valid: {', '.join(RESIDUAL_INITS)}")
    blocks = [b for b in getattr(model, "blocks", []) if isinstance(b, BasicBlock)]
    with torch.no_grad():
        if kind == "zero_gamma":
            for block in blocks:
                nn.init.zeros_(block.norm2.weight)
        elif kind == "fixup":
            _fixup(model, blocks)


def _fixup(model: nn.Module, blocks: list[BasicBlock]) -> None:
    """Zhang et al. 2019, with m = 2 layers a branch: first conv x L^(-1/(2m-2)), last conv and classifier at 0."""
    shrink = len(blocks) ** (-1.0 / (2 * 2 - 2))
    for block in blocks:
        block.conv1.weight.mul_(shrink)
        nn.init.zeros_(block.conv2.weight)
    nn.init.zeros_(model.head.weight)
    nn.init.zeros_(model.head.bias)
