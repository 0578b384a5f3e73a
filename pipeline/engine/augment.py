"""Standard CIFAR augmentation, in batch on the data's device (as airbench does it).

Each image of a training batch is shifted by a random crop of its 4-pixel zero-padded self (the
``RandomCrop(32, padding=4)`` of torchvision, applied after normalization, so the padding is the
mean colour) and flipped left-right with probability 1/2. A whole batch takes a few tensor ops, no
per-image Python and no worker processes; the draws come from the trial's own generator, so a seed
gives the same augmented epochs on the same device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F

#: Pixels of zero padding around each image before the random crop.
PAD = 4
#: The augmentation's generator is seeded with the trial's seed plus this (the shuffle's is seed + 1).
AUGMENT_SEED_OFFSET = 2


def batch_augmenter(enabled: bool, seed: int, device: torch.device) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """``augment_images`` with a generator of its own on ``device``, seeded from the trial's seed (None: off)."""
    if not enabled:
        return None
    generator = torch.Generator(device=device).manual_seed(seed + AUGMENT_SEED_OFFSET)
    return lambda x: augment_images(x, generator)


def augment_images(x: torch.Tensor, generator: torch.Generator, pad: int = PAD) -> torch.Tensor:
    """A randomly cropped and flipped copy of a batch of images (B, C, H, W); other shapes pass through."""
    if x.dim() != 4:
        return x
    return _random_flip(_random_crop(x, generator, pad), generator)


def _random_crop(x: torch.Tensor, generator: torch.Generator, pad: int) -> torch.Tensor:
    batch, _, height, width = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (2, batch), generator=generator, device=generator.device).to(x.device)
    rows = (offsets[0, :, None] + torch.arange(height, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (offsets[1, :, None] + torch.arange(width, device=x.device))[:, None, :]  # (B, 1, W)
    samples = torch.arange(batch, device=x.device)[:, None, None]
    crops = padded.permute(0, 2, 3, 1)[samples, rows, cols]  # (B, H, W, C)
    return crops.permute(0, 3, 1, 2).contiguous()


def _random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(len(x), generator=generator, device=generator.device).to(x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)
