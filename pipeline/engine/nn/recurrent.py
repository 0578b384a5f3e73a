"""Recurrent models: a vanilla RNN and a GRU reading an input as a sequence, with a linear head.

Each layer is unrolled in Python over time steps (sequences here are tens of steps) with its
input-to-hidden and hidden-to-hidden maps as ``nn.Linear``: the initializer reaches both like any
other weight, and the diagnostics can see the hidden state at every step (a fused ``nn.RNN``
hides them). The equations are PyTorch's (``nn.RNN``, ``nn.GRU``, gate order r, z, n).

Hidden-to-hidden weights are initialized per gate block by ``initializer.recurrent`` (default:
the same scheme as the rest): ``orthogonal`` keeps the recurrent signal's norm, ``identity`` is
IRNN (Le et al. 2015).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from pipeline.config import ActivationConfig, ConfigError, InitializerConfig, ModelConfig, NormalizationConfig
from pipeline.engine.nn.activations import build_activation

GATES = {"rnn": 1, "gru": 3}


class RecurrentLayer(nn.Module):
    """(B, T, F) -> (B, T, H). Keeps the hidden states of the last call when ``capture`` is on."""

    def __init__(self, kind: str, in_features: int, hidden: int, act: nn.Module) -> None:
        super().__init__()
        self.kind, self.hidden, self.act = kind, hidden, act
        self.ih = nn.Linear(in_features, GATES[kind] * hidden)
        self.hh = nn.Linear(hidden, GATES[kind] * hidden)
        self.capture = False
        self.states: list[torch.Tensor] = []

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        inputs = self.ih(xs)  # all steps at once: (B, T, G*H)
        h = xs.new_zeros(xs.shape[0], self.hidden)
        states = []
        for t in range(xs.shape[1]):
            h = self._step(inputs[:, t], h)
            states.append(h)
        self.states = states if self.capture else []
        return torch.stack(states, dim=1)

    def _step(self, x_gates: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        h_gates = self.hh(h)
        if self.kind == "rnn":
            return self.act(x_gates + h_gates)
        x_r, x_z, x_n = x_gates.chunk(3, dim=1)
        h_r, h_z, h_n = h_gates.chunk(3, dim=1)
        r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return (1 - z) * n + z * h


class RecurrentNetwork(nn.Module):
    """``head(last hidden state)`` of stacked recurrent layers over the input read as a sequence."""

    recurrent = True

    def __init__(self, layers: list[RecurrentLayer], steps: int, features: int, num_classes: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.steps, self.features = steps, features
        self.head = nn.Linear(layers[-1].hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = to_sequence(x, self.steps, self.features)
        for layer in self.layers:
            seq = layer(seq)
        return self.head(seq[:, -1])

    def hidden_weights(self) -> list[torch.Tensor]:
        return [w for layer in self.layers for w in (layer.ih.weight, layer.hh.weight)]

    def spectral_radius(self) -> float:
        """Largest |eigenvalue| of the hidden-to-hidden map (the candidate block n for a GRU), over layers."""
        radii = []
        for layer in self.layers:
            block = layer.hh.weight.detach().chunk(GATES[layer.kind], dim=0)[-1]
            radii.append(float(torch.linalg.eigvals(block.double()).abs().max()))
        return max(radii)


def to_sequence(x: torch.Tensor, steps: int, features: int) -> torch.Tensor:
    """(B, C, L) -> steps along L; (B, C, H, W) -> image rows; (B, F) -> chunks of F. Out: (B, T, F')."""
    if x.dim() == 3:
        x = x.transpose(1, 2)  # (B, L, C): a step is one position of every channel
    elif x.dim() == 4:
        x = x.permute(0, 2, 1, 3)  # (B, H, C, W): a step is one row of every channel
    return x.reshape(x.shape[0], steps, features)


def sequence_shape(input_shape: tuple, features_per_step) -> tuple[int, int]:
    """(steps, features per step) for an input shape; ``features_per_step`` groups positions."""
    if len(input_shape) == 3:
        base_steps, base_features = input_shape[1], input_shape[0] * input_shape[2]
    elif len(input_shape) == 2:
        base_steps, base_features = input_shape[1], input_shape[0]
    else:
        base_steps, base_features = input_shape[0], 1
    group = 1 if features_per_step is None else features_per_step // base_features
    if features_per_step is not None and (group < 1 or features_per_step % base_features or base_steps % group):
        raise ConfigError(
            f"model.features_per_step={features_per_step} does not fit inputs of shape {tuple(input_shape)}; "
            f"use a multiple of {base_features} that divides {base_steps * base_features}"
        )
    return base_steps // group, base_features * group


def build_recurrent(kind: str):
    def build(cfg: ModelConfig, act: ActivationConfig, norm: NormalizationConfig, input_shape: tuple, num_classes: int):
        if norm.name != "none":
            raise ConfigError(f"normalization={norm.name} is not available for model={kind}; valid: none")
        if kind == "rnn" and act.name not in ("tanh", "relu"):
            raise ConfigError(f"activation={act.name} is invalid for model=rnn; valid: tanh, relu")
        steps, features = sequence_shape(input_shape, cfg.features_per_step)
        layers = [
            RecurrentLayer(kind, features if i == 0 else cfg.width, cfg.width, build_activation(act))
            for i in range(cfg.depth)
        ]
        return RecurrentNetwork(layers, steps, features, num_classes)

    return build


def init_recurrent(model: nn.Module, cfg: InitializerConfig, scale: float, gain: float, generator=None) -> None:
    """Re-initialize every hidden-to-hidden weight gate block by block with ``cfg.recurrent``."""
    from pipeline.engine.nn.initializers import init_weight

    if not getattr(model, "recurrent", False) or cfg.name == "pretrained":
        return
    scheme = dataclasses.replace(cfg, name=cfg.recurrent or cfg.name)
    for layer in model.layers:
        for block in layer.hh.weight.data.chunk(GATES[layer.kind], dim=0):  # (H, H) per gate
            init_weight(block, scheme, scale, gain, generator)
