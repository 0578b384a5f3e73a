"""CIFAR ResNets: the paper's sizes, and the residual initializers as their papers define them."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ActivationConfig, ConfigError, ModelConfig, NormalizationConfig, config_from_dict
from pipeline.config.catalog import validate
from pipeline.config.composition import compose
from pipeline.engine.diagnostics import probe
from pipeline.engine.nn.initializers import apply_init
from pipeline.engine.nn.models import build_model
from pipeline.engine.nn.resnet import BasicBlock, initialize_residual

CIFAR = (3, 32, 32)


def resnet(depth: int = 20, norm: str = "batch", residual_init: str = "none", seed: int = 0, shape=CIFAR):
    torch.manual_seed(seed)
    cfg = ModelConfig(name="resnet", depth=depth, residual_init=residual_init)
    model = build_model(cfg, ActivationConfig("relu"), NormalizationConfig(norm), shape, 10)
    apply_init(model, config_from_dict(compose([])).initializer, 1.0, 2**0.5, torch.Generator().manual_seed(seed))
    initialize_residual(model)
    return model


# He et al. 2016, Table 6: ResNet-20 0.27 M, ResNet-56 0.85 M, ResNet-110 1.7 M parameters.
@pytest.mark.parametrize(("depth", "millions"), [(20, 0.27), (56, 0.85), (110, 1.7)])
def test_parameter_counts_are_the_papers(depth, millions):
    model = resnet(depth)
    count = sum(p.numel() for p in model.parameters())
    assert round(count / 1e6, 2 if millions < 1 else 1) == millions
    assert len(model.blocks) == 1 + 3 * (depth - 2) // 6  # the stem, then n blocks in each of 3 stages


def _blocks_are_their_shortcuts(model) -> list[bool]:
    """Each residual block's output against its shortcut's, on the input it gets in the network."""
    h, same = model.blocks[0](torch.randn(4, 3, 32, 32)), []
    for block in model.blocks[1:]:
        out = block(h)
        same.append(torch.allclose(out, block.shortcut(h), atol=1e-6))
        h = out
    return same


@pytest.mark.parametrize(("residual_init", "norm"), [("fixup", "none"), ("skipinit", "none"), ("zero_gamma", "batch")])
def test_fixup_skipinit_and_zero_gamma_compute_the_identity_through_every_branch(residual_init, norm):
    assert all(_blocks_are_their_shortcuts(resnet(20, norm, residual_init)))


def test_without_a_residual_init_the_branches_are_not_zero():
    assert not any(_blocks_are_their_shortcuts(resnet(20, "batch", "none")))


def test_fixup_rescales_the_first_conv_by_the_root_of_the_depth_and_zeroes_the_last_and_the_head():
    plain, fixup = resnet(56, "none", "none", seed=3), resnet(56, "none", "fixup", seed=3)
    blocks = [b for b in fixup.blocks if isinstance(b, BasicBlock)]
    assert len(blocks) == 27
    for ours, theirs in zip(blocks, [b for b in plain.blocks if isinstance(b, BasicBlock)]):
        assert torch.allclose(ours.conv1.weight, theirs.conv1.weight * 27**-0.5)
        assert not ours.conv2.weight.any()
        assert not ours.biases.any() and ours.multiplier.item() == 1.0
    assert not fixup.head.weight.any() and not fixup.head.bias.any()
    assert torch.equal(fixup.blocks[0].layer.weight, plain.blocks[0].layer.weight)  # the stem is the initializer's


def test_skipinit_scalars_are_learnable_and_start_at_zero():
    model = resnet(20, "none", "skipinit")
    alphas = [b.alpha for b in model.blocks if isinstance(b, BasicBlock)]
    assert len(alphas) == 9 and all(a.requires_grad and a.item() == 0.0 for a in alphas)
    loss = model(torch.randn(8, 3, 32, 32)).logsumexp(dim=1).mean()
    loss.backward()
    assert any(a.grad.abs().item() > 0 for a in alphas)  # the branches can open


@pytest.mark.parametrize("depth", [7, 21, 2])
def test_a_depth_that_is_not_6n_plus_2_is_refused_naming_the_valid_ones(depth):
    with pytest.raises(ConfigError, match=rf"model.depth={depth} is invalid for model=resnet.*6n\+2 \(8, 14, 20"):
        resnet(depth)


def test_zero_gamma_without_a_normalization_is_refused():
    with pytest.raises(ConfigError, match="residual_init=zero_gamma .* needs one: normalization=batch"):
        resnet(20, "none", "zero_gamma")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model=resnet", "model.residual_init=fixed"],
            "model.residual_init=fixed is invalid; valid: none, zero_gamma",
        ),
        (["model=mlp", "model.residual_init=fixup"], "model.residual_init=fixup is for model=resnet"),
        (["model=resnet", "model.width_multiplier=0"], "model.width_multiplier"),
    ],
)
def test_bad_resnet_options_are_refused_before_any_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(config_from_dict(compose(overrides)))


def test_the_probe_measures_the_stem_and_every_block_on_the_residual_stream():
    model = resnet(20, "batch", "none")
    result = probe(model, torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))
    assert len(result.layers) == 10
    assert all(row["grad_norm"] > 0 and row["act_std"] > 0 for row in result.layers)
    assert 0 < result.summary["grad_norm_ratio"] < float("inf")


def test_a_resnet_trains_on_small_images():
    model = resnet(8, "batch", "none", shape=(1, 8, 8))
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(10):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.7
