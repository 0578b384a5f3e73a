"""Recurrent models, recurrent-weight init and diagnostics, maxout, LARS."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.config import (
    ActivationConfig,
    ConfigError,
    InitializerConfig,
    ModelConfig,
    NormalizationConfig,
    OptimizerConfig,
)
from pipeline.engine.diagnostics import probe
from pipeline.engine.nn.activations import Maxout, maxout_gain
from pipeline.engine.nn.models import build_model
from pipeline.engine.nn.recurrent import init_recurrent, sequence_shape
from pipeline.engine.optim import LARS, build_optimizer


def recurrent(kind: str, width=16, depth=1, act="tanh", shape=(1, 40), fps=None):
    cfg = ModelConfig(name=kind, width=width, depth=depth, features_per_step=fps)
    return build_model(cfg, ActivationConfig(name=act), NormalizationConfig(), shape, 10)


@pytest.mark.parametrize("kind, reference", [("rnn", nn.RNN), ("gru", nn.GRU)])
def test_unrolled_layers_equal_pytorch_fused_ones(kind, reference):
    torch.manual_seed(0)
    model = recurrent(kind, width=12, shape=(3, 7))
    ref = reference(3, 12, batch_first=True)
    layer = model.layers[0]
    with torch.no_grad():
        ref.weight_ih_l0.copy_(layer.ih.weight), ref.weight_hh_l0.copy_(layer.hh.weight)
        ref.bias_ih_l0.copy_(layer.ih.bias), ref.bias_hh_l0.copy_(layer.hh.bias)
    x = torch.randn(5, 3, 7)  # (B, C, L): 7 steps of 3 features
    ours = layer(x.transpose(1, 2))
    theirs, _ = ref(x.transpose(1, 2))
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_sequence_layouts():
    assert sequence_shape((1, 40), None) == (40, 1)
    assert sequence_shape((1, 40), 4) == (10, 4)
    assert sequence_shape((1, 8, 8), None) == (8, 8)  # digits row by row
    with pytest.raises(ConfigError, match="features_per_step=3"):
        sequence_shape((1, 40), 3)


def test_recurrent_weights_get_their_own_scheme_per_gate():
    model = recurrent("gru", width=16)
    cfg = InitializerConfig(name="normal", std=0.5, recurrent="orthogonal", gain=1.0)
    init_recurrent(model, cfg, scale=1.0, gain=1.0, generator=torch.Generator().manual_seed(0))
    for block in model.layers[0].hh.weight.detach().chunk(3, dim=0):  # r, z, n
        assert torch.allclose(block @ block.T, torch.eye(16), atol=1e-5)


def test_identity_recurrent_weights_are_irnn():
    model = recurrent("rnn", act="relu")
    init_recurrent(model, InitializerConfig(name="normal", recurrent="identity"), scale=1.0, gain=1.0)
    assert torch.equal(model.layers[0].hh.weight.detach(), torch.eye(16))
    assert model.spectral_radius() == pytest.approx(1.0)


def grad_reach(recurrent_scheme: str, std: float, seed: int = 1) -> float:
    """||dL/dh_1|| / ||dL/dh_40|| at init, small input weights (hidden states in tanh's linear range)."""
    from pipeline.engine.nn.initializers import apply_init

    model = recurrent("rnn", width=32, act="tanh")
    cfg = InitializerConfig(name="normal", std=std, recurrent=recurrent_scheme, gain=1.0)
    generator = torch.Generator().manual_seed(seed)
    apply_init(model, InitializerConfig(name="normal", std=0.05), 1.0, 1.0, generator)
    init_recurrent(model, cfg, 1.0, 1.0, generator)
    x, y = torch.randn(64, 1, 40, generator=generator), torch.randint(0, 10, (64,), generator=generator)
    result = probe(model, x, y)
    assert len(result.layers) == 40 and result.layers[0]["time_step"] == 1
    return result.summary["grad_norm_ratio"]


def test_orthogonal_recurrence_keeps_the_gradient_over_40_steps_where_gaussians_do_not():
    for seed in (1, 2):
        assert 0.1 < grad_reach("orthogonal", std=0.3, seed=seed) < 10  # norm-preserving: O(1) after 40 steps
        assert grad_reach("normal", std=0.05, seed=seed) < 1e-6  # radius ~0.3: vanishes as 0.3^40
        assert grad_reach("normal", std=0.3, seed=seed) > 5  # radius ~1.8: explodes backwards


def test_maxout_takes_the_max_of_each_group_and_widens_the_layer_before():
    out = Maxout(3)(torch.tensor([[1.0, 5.0, 2.0, -1.0, -3.0, -2.0]]))
    assert out.tolist() == [[5.0, -1.0]]
    model = build_model(
        ModelConfig(depth=2, width=8), ActivationConfig(name="maxout", pieces=3), NormalizationConfig(), (4,), 10
    )
    assert model.blocks[0].layer.out_features == 24 and model.blocks[1].layer.in_features == 8
    assert model(torch.randn(5, 4)).shape == (5, 10)


@pytest.mark.parametrize("pieces", [1, 2, 4])
def test_maxout_gain_keeps_the_second_moment(pieces):
    z = torch.randn(400_000, pieces, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    second_moment = (maxout_gain(pieces) * z.max(dim=1).values).pow(2).mean()
    assert float(second_moment) == pytest.approx(1.0, abs=0.01)


def lars_reference(w, g, v, lr, momentum, wd, eta):
    """You et al. 2017, Algorithm 1, written out by hand."""
    local_lr = eta * w.norm() / (g.norm() + wd * w.norm())
    v = momentum * v + lr * local_lr * (g + wd * w)
    return w - v, v


def test_lars_follows_its_published_update_rule():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 4))
    opt = LARS([w], lr=0.5, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.01)
    ref_w, ref_v = w.detach().clone(), torch.zeros(6, 4)
    for _ in range(3):
        g = torch.randn(6, 4)
        w.grad = g.clone()
        ref_w, ref_v = lars_reference(ref_w, g, ref_v, 0.5, 0.9, 1e-3, 0.01)
        opt.step()
        assert torch.allclose(w.detach(), ref_w, atol=1e-6)


def test_lars_leaves_biases_unadapted_and_moves_zero_weights():
    bias, zero = nn.Parameter(torch.ones(3)), nn.Parameter(torch.zeros(2, 2))
    bias.grad, zero.grad = torch.full((3,), 2.0), torch.ones(2, 2)
    build_optimizer([bias, zero], OptimizerConfig(name="lars", lr=0.1, momentum=0.0, trust_coefficient=0.001)).step()
    assert torch.allclose(bias.detach(), torch.full((3,), 0.8))  # plain SGD step
    assert torch.allclose(zero.detach(), torch.full((2, 2), -0.1))  # local rate 1 where ||w|| = 0


def test_recurrent_models_reject_what_they_cannot_do():
    with pytest.raises(ConfigError, match="normalization=batch is not available for model=rnn"):
        build_model(
            ModelConfig(name="rnn"), ActivationConfig(name="tanh"), NormalizationConfig(name="batch"), (1, 40), 10
        )
    with pytest.raises(ConfigError, match="activation=gelu is invalid for model=rnn"):
        build_model(ModelConfig(name="rnn"), ActivationConfig(name="gelu"), NormalizationConfig(), (1, 40), 10)
    assert math.isfinite(recurrent("gru", shape=(1, 8, 8))(torch.randn(2, 1, 8, 8)).sum().item())
