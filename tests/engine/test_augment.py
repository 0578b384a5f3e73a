"""CIFAR augmentation in batch: each image a window of its padded self, maybe flipped; seeded."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import DatasetConfig
from pipeline.engine.augment import PAD, augment_images, batch_augmenter
from pipeline.engine.data import load_dataset
from pipeline.engine.train import run_trial


def _windows(image: torch.Tensor) -> list[torch.Tensor]:
    """Every crop of the padded image, and its mirror: what augmentation may give for it."""
    padded = F.pad(image, (PAD, PAD, PAD, PAD))
    h, w = image.shape[-2:]
    crops = [padded[:, i : i + h, j : j + w] for i in range(2 * PAD + 1) for j in range(2 * PAD + 1)]
    return crops + [c.flip(-1) for c in crops]


def test_each_image_becomes_a_crop_of_its_padded_self_or_its_mirror():
    x = torch.randn(16, 3, 12, 12)
    out = augment_images(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for image, augmented in zip(x, out):
        assert any(torch.equal(augmented, window) for window in _windows(image))


def test_crops_and_flips_vary_across_a_batch():
    x = torch.randn(1, 3, 8, 8).expand(64, -1, -1, -1)
    out = augment_images(x, torch.Generator().manual_seed(1))
    distinct = {tuple(img.flatten().tolist()) for img in out}
    assert len(distinct) > 20
    flipped = sum(any(torch.equal(img, w) for w in _windows(x[0])[81:]) for img in out)
    assert 10 < flipped < 54  # about half, not all or none


def test_the_same_seed_gives_the_same_batches_and_another_seed_others():
    x = torch.randn(32, 3, 8, 8)
    first, again, other = (batch_augmenter(True, seed, torch.device("cpu")) for seed in (5, 5, 6))
    assert torch.equal(first(x), again(x)) and torch.equal(first(x), again(x))
    assert not torch.equal(batch_augmenter(True, 5, torch.device("cpu"))(x), other(x))
    assert batch_augmenter(False, 5, torch.device("cpu")) is None


def test_inputs_that_are_not_images_pass_through():
    x = torch.randn(8, 40)
    assert augment_images(x, torch.Generator().manual_seed(0)) is x


def test_channel_norm_gives_each_channel_zero_mean_unit_std_on_the_training_split():
    splits = load_dataset(DatasetConfig(name="digits", input_norm="channel"))
    x = splits.x_train.double()
    assert abs(x.mean().item()) < 1e-6 and abs(x.std().item() - 1) < 1e-3
    # One shift and scale for the whole channel: pixel-wise structure (the borders' zeros) stays.
    raw_border = x[:, 0, 0, 0]
    assert np.unique(raw_border.numpy().round(5)).size <= 3


def test_a_trial_trains_with_augmentation_and_repeats_exactly(make_config):
    config = make_config("model=cnn", "model.channels=8", "dataset.augment=true", "train.epochs=2", "train.threads=1")
    first, again = run_trial(config), run_trial(config)
    assert [h["train_loss"] for h in first.history[1:]] == [h["train_loss"] for h in again.history[1:]]
    plain = run_trial(make_config("model=cnn", "model.channels=8", "train.epochs=2", "train.threads=1"))
    assert plain.history[1]["train_loss"] != first.history[1]["train_loss"]
