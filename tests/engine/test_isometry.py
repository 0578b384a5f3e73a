"""Dynamical isometry (pipeline/engine/isometry.py): the input-output Jacobian's squared singular
values, against Saxe et al. 2013 and Pennington et al. 2017 (shared/SCIENCE.md section 6)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import ActivationConfig, InitializerConfig, ModelConfig, NormalizationConfig
from pipeline.config.composition import compose
from pipeline.engine import isometry, theory
from pipeline.engine.nn.initializers import apply_init
from pipeline.engine.nn.models import build_model
from pipeline.engine.train import prepare_trial

WIDTH = 128


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _net(act: str, init: str, depth: int, scale: float = 1.0, bias_std: float = 0.0, n_in: int = WIDTH):
    """A plain MLP of square hidden layers, ``init`` at gain 1 times ``scale``; biases N(0, bias_std^2)."""
    model = build_model(
        ModelConfig(depth=depth, width=WIDTH), ActivationConfig(act), NormalizationConfig(), (n_in,), 10
    )
    cfg = InitializerConfig(name=init, gain=1.0, bias="normal" if bias_std else "zeros", bias_value=bias_std)
    apply_init(model, cfg, scale, 1.0, torch.Generator().manual_seed(0))
    return model


def _probe(q0: float = 1.0, n_in: int = WIDTH) -> torch.Tensor:
    return math.sqrt(q0) * torch.randn(4, n_in, generator=torch.Generator().manual_seed(1))


def test_an_orthogonal_deep_linear_net_has_every_singular_value_one():
    # A first layer wider than the input keeps orthonormal columns: J^T J = I exactly.
    model = _net("identity", "orthogonal", depth=8, n_in=32)
    got = isometry.isometry_metrics(model, _probe(n_in=32))
    for key in ("isometry_sv2_min", "isometry_sv2_max", "isometry_sv2_mean"):
        assert got[key] == pytest.approx(1.0, abs=1e-4), key
    assert got["isometry_sv2_std"] < 1e-4


def test_gaussian_deep_linear_nets_spread_their_spectrum_with_depth():
    """Variance-preserving (1/fan_in) Gaussian weights: the mean stays near 1, the spread grows
    (std 1.4, 3.2, 5.2 at depths 2, 8, 32)."""
    spectra = [isometry.isometry_metrics(_net("identity", "kaiming_normal", depth), _probe()) for depth in (2, 8, 32)]
    stds = [s["isometry_sv2_std"] for s in spectra]
    assert stds == sorted(stds) and stds[-1] > 3 * stds[0]
    assert all(s["isometry_sv2_mean"] == pytest.approx(1.0, abs=0.2) for s in spectra)
    assert spectra[-1]["isometry_sv2_max"] > 5 * spectra[0]["isometry_sv2_max"]


def test_critical_tanh_is_isometric_with_orthogonal_weights_and_not_with_gaussian():
    """Pennington et al. 2017: at criticality and small q*, orthogonal weights keep the Jacobian's
    spectrum near 1 (depth 32: std/mean 0.3); Gaussian ones spread it as in a linear net (5.9)."""
    sigma_b2 = 1e-5
    sigma_w2 = theory.critical_sigma_w2(ActivationConfig("tanh"), sigma_b2)  # 1.040, q* = 0.020
    q_star = theory.predict(ActivationConfig("tanh"), sigma_w2, sigma_b2, depth=1).q_star
    spread = {}
    for init in ("orthogonal", "kaiming_normal"):
        model = _net("tanh", init, depth=32, scale=math.sqrt(sigma_w2), bias_std=math.sqrt(sigma_b2))
        got = isometry.isometry_metrics(model, _probe(q_star))
        assert got["isometry_sv2_mean"] == pytest.approx(1.0, abs=0.2)  # chi_1 = 1 per layer
        spread[init] = got["isometry_sv2_std"] / got["isometry_sv2_mean"]
    assert spread["orthogonal"] < 0.5 < 2 < spread["kaiming_normal"]


def test_a_cnn_gets_its_pooled_features_spectrum():
    prep = prepare_trial(compose(["model=cnn", "model.channels=16", "model.depth=2"]))
    got = isometry.isometry_metrics(prep.model, prep.splits.x_train[:4])
    sv2 = isometry.squared_singular_values(prep.model, prep.splits.x_train[:4])
    assert sv2.shape == (4, 16)  # 16 pooled channels against 64 pixels
    assert got["isometry_sv2_mean"] == pytest.approx(float(sv2.mean()))
    assert 0 < got["isometry_sv2_min"] <= got["isometry_sv2_p05"] <= got["isometry_sv2_p95"] <= got["isometry_sv2_max"]


@pytest.mark.parametrize("overrides", [["normalization=batch"], ["model=rnn"]])
def test_batch_norm_and_recurrent_models_get_no_spectrum(overrides):
    prep = prepare_trial(compose(["model.width=16", "model.depth=2", *overrides]))
    assert isometry.isometry_metrics(prep.model, prep.splits.x_train[:4]) == {}


def test_layer_norm_and_residual_mlps_get_a_spectrum():
    prep = prepare_trial(compose(["model.width=16", "model.depth=3", "normalization=layer", "model.residual=true"]))
    assert set(isometry.isometry_metrics(prep.model, prep.splits.x_train[:4])) == {
        f"isometry_sv2_{name}" for name in ("mean", "std", "p05", "p95", "min", "max")
    }
