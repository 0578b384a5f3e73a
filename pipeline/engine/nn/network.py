"""The shape every block-stacked model shares: ``head(pool(blocks(stem(x))))``.

Diagnostics rely on it: ``model.blocks`` are the hidden layers (or residual blocks), each with
``.layer`` (whose weight the update ratios follow) and a ``capture`` protocol (see ``Block``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class Block(nn.Module):
    """One hidden layer: ``act(norm(layer(x)))``, plus ``x`` when residual.

    While ``capture`` is a dict (the diagnostics probe sets one), a forward pass keeps in it the
    layer's output ``pre_act`` (in the graph), the activation's input ``act_in`` and output ``out``:
    cheaper than three forward hooks, which also put every call on PyTorch's slow path.
    """

    def __init__(self, layer: nn.Module, norm: nn.Module, act: nn.Module, residual: bool) -> None:
        super().__init__()
        self.layer, self.norm, self.act = layer, norm, act
        self.residual = residual
        self.capture: Optional[dict] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre_act = self.layer(x)
        act_in = self.norm(pre_act)
        h = self.act(act_in)
        if self.capture is not None:
            self.capture.update(pre_act=pre_act, act_in=act_in.detach(), out=h.detach())
        return x + h if self.residual else h


class Network(nn.Module):
    """``head(pool(blocks(x)))``; ``pool`` flattens (MLP) or averages positions (CNN)."""

    def __init__(self, stem: nn.Module, blocks: list[Block], pool: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.stem, self.pool, self.head = stem, pool, head
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(self.pool(h))

    def hidden_weights(self) -> list[torch.Tensor]:
        return [block.layer.weight for block in self.blocks]
