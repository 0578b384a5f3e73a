"""Mean-field theory (pipeline/engine/theory.py) against closed forms, the literature, an
independent quadrature, wide random networks, and what diagnostics measure on trial models.

Oracles: ReLU and linear closed forms (shared/SCIENCE.md section 6); tanh's critical line at
sigma_b^2 = 0.05 (Schoenholz et al. 2017: sigma_w^2 near 1.76); scipy.integrate.quad and a plain
Gauss-Hermite product rule, written here apart from the module's panel quadrature.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, optimize

from pipeline.config import ActivationConfig
from pipeline.config.catalog import ACTIVATIONS
from pipeline.config.composition import compose
from pipeline.engine import diagnostics, theory
from pipeline.engine.nn.activations import activation_gain, build_activation
from pipeline.engine.train import prepare_trial

TANH, RELU, LINEAR = ActivationConfig("tanh"), ActivationConfig("relu"), ActivationConfig("identity")
ELEMENTWISE = [name for name in ACTIVATIONS.names() if name != "maxout"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Many small float64 evaluations: OpenMP's spinning threads make them 10x slower on 2 CPUs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gaussian_mean(f, q: float) -> float:
    """E[f(u)], u ~ N(0, q), by adaptive quadrature: the oracle for the module's panel rule."""
    s = math.sqrt(q)
    density = lambda u: f(u) * math.exp(-u * u / (2 * q)) / math.sqrt(2 * math.pi * q)  # noqa: E731
    return integrate.quad(density, -12 * s - 20, 12 * s + 20, points=[0.0], limit=400, epsabs=1e-13)[0]


# --- closed forms -------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_w2", [1.0, 2.0, 3.0])
def test_relu_has_chi1_half_of_sigma_w2_and_a_geometric_length_map(sigma_w2):
    mf = theory.predict(RELU, sigma_w2, 0.0, depth=5, q0=1.7)
    assert mf.chi1 == pytest.approx(sigma_w2 / 2, rel=1e-9)
    expected = [sigma_w2 * 1.7 * (sigma_w2 / 2) ** layer for layer in range(5)]
    assert mf.q == pytest.approx(expected, rel=1e-9)
    assert mf.grad_norm_ratio == pytest.approx((sigma_w2 / 2) ** 2, rel=1e-9)  # sqrt of 4 factors chi1
    assert mf.xi_c == (math.inf if sigma_w2 >= 2 else pytest.approx(-1 / math.log(sigma_w2 / 2)))


def test_relu_is_critical_at_two_without_bias_and_never_with_one():
    assert theory.critical_sigma_w2(RELU, 0.0) == pytest.approx(2.0, rel=1e-9)
    assert theory.critical_sigma_w2(RELU, 0.05) is None  # q* is infinite where chi_1 = 1
    assert theory.predict(RELU, 2.0, 0.05, depth=3).q_star == math.inf


def test_the_remembered_critical_value_is_each_activations_own():
    """Leaky ReLU is critical at 2 / (1 + slope^2): the value remembered for one slope (or one
    sigma_b^2) is never another's."""
    for slope in (0.01, 0.2, 0.01, 0.5):
        leaky = ActivationConfig("leaky_relu", slope=slope)
        assert theory.critical_sigma_w2(leaky, 0.0) == pytest.approx(2.0 / (1.0 + slope**2), rel=1e-9)
    assert theory.critical_sigma_w2(TANH, 0.0) == pytest.approx(1.0, rel=1e-10)  # rounding decides no branch
    assert theory.critical_sigma_w2(TANH, 0.05) == pytest.approx(1.76, abs=0.005)


@pytest.mark.parametrize("c", [0.0, 0.5, 0.9, 1.0])
def test_relu_pair_expectations_are_the_arc_cosine_kernel(c):
    """Cho & Saul's arc-cosine kernels: E[phi phi] = q (sin t + (pi - t) cos t) / (2 pi) and
    E[phi' phi'] = (pi - t) / (2 pi), t = arccos c (c = 0: independent inputs, the factored rule)."""
    q, t = 1.7, math.acos(c)
    pair = theory._pair(theory._Phi(RELU), q, c)
    assert pair == pytest.approx((q * (math.sin(t) + (math.pi - t) * c) / (2 * math.pi), (math.pi - t) / (2 * math.pi)))


@pytest.mark.parametrize("sigma_w2, sigma_b2, q0", [(30.0, 0.0, 1e-4), (3.0, 0.3, 1e-3)])
def test_a_growing_length_map_stops_at_its_fixed_point(sigma_w2, sigma_b2, q0):
    """q* several rungs above the first layer's q: the root itself, not the rung that brackets it."""
    mf = theory.predict(TANH, sigma_w2, sigma_b2, depth=2, q0=q0)
    length = lambda q: sigma_w2 * _gaussian_mean(lambda u: math.tanh(u) ** 2, q) + sigma_b2 - q  # noqa: E731
    assert mf.q[0] < mf.q_star == pytest.approx(optimize.brentq(length, 1e-3, 100.0), rel=1e-8)


@pytest.mark.parametrize("sigma_w2", [0.5, 1.0, 1.5])
def test_linear_net_multiplies_q_by_sigma_w2_per_layer(sigma_w2):
    mf = theory.predict(LINEAR, sigma_w2, 0.0, depth=6, q0=0.8)
    assert mf.chi1 == pytest.approx(sigma_w2, rel=1e-9)
    assert mf.q[-1] == pytest.approx(sigma_w2**6 * 0.8, rel=1e-9)
    assert mf.grad_norm_ratio == pytest.approx(sigma_w2 ** (5 / 2), rel=1e-9)
    assert mf.act_std == pytest.approx([math.sqrt(q) for q in mf.q], rel=1e-9)
    assert theory.critical_sigma_w2(LINEAR, 0.0) == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize("sigma_w2", [0.5, 0.9])
def test_tanh_below_one_without_bias_is_ordered_with_q_star_zero(sigma_w2):
    mf = theory.predict(TANH, sigma_w2, 0.0, depth=3)
    assert mf.q_star == 0.0
    assert mf.chi1 == pytest.approx(sigma_w2, rel=1e-6)  # phi'(0) = 1
    assert mf.c_star == 1.0
    assert mf.xi_c == pytest.approx(-1 / math.log(sigma_w2), rel=1e-5)
    assert mf.trainable_depth == pytest.approx(6 * mf.xi_c)


def test_tanh_critical_sigma_w2_tends_to_one_as_the_bias_vanishes():
    values = [theory.critical_sigma_w2(TANH, sb2) for sb2 in (1e-2, 1e-4, 1e-6, 0.0)]
    assert values == sorted(values, reverse=True)
    assert values[-1] == pytest.approx(1.0, abs=1e-6)
    assert 1.0 < values[-2] < 1.02  # slowly: along the line sigma_b^2 grows like q*^3


# --- the literature and independent quadratures --------------------------------------------------


def test_tanh_critical_line_matches_schoenholz_and_an_independent_quadrature():
    """Schoenholz et al. 2017 (and shared/SCIENCE.md): sigma_w^2 near 1.76 at sigma_b^2 = 0.05.

    Here 1.76095; the same root found with scipy's adaptive quadrature agrees to 1e-9.
    """
    critical = theory.critical_sigma_w2(TANH, 0.05)
    assert critical == pytest.approx(1.76, abs=0.005)
    q_star = optimize.brentq(lambda q: critical * _gaussian_mean(lambda u: math.tanh(u) ** 2, q) + 0.05 - q, 1e-3, 10)
    chi1 = critical * _gaussian_mean(lambda u: math.cosh(u) ** -4, q_star)
    assert chi1 == pytest.approx(1.0, abs=1e-9)
    mf = theory.predict(TANH, critical, 0.05, depth=3)
    assert mf.chi1 == pytest.approx(1.0, abs=1e-9)
    assert mf.q_star == pytest.approx(q_star, rel=1e-8)
    assert (mf.c_star, mf.xi_c, mf.trainable_depth) == (1.0, math.inf, math.inf)
    assert theory.critical_sigma_w2(TANH, 0.04) == pytest.approx(1.70080, abs=1e-4)


@pytest.mark.parametrize("q", [0.01, 1.0, 30.0, 1000.0])
def test_moments_stay_exact_where_q_is_large(q):
    # A 100-node Gauss-Hermite rule is 2% off for E[tanh'^2] at q = 10 and 88% at q = 100.
    m = theory._moments(theory._Phi(TANH), q)
    assert m.slope2 == pytest.approx(_gaussian_mean(lambda u: math.cosh(u) ** -4, q), rel=1e-7)
    assert m.square == pytest.approx(_gaussian_mean(lambda u: math.tanh(u) ** 2, q), rel=1e-7)


def test_chaotic_tanh_correlation_matches_a_gauss_hermite_product_rule():
    mf = theory.predict(TANH, 2.5, 0.05, depth=2)
    assert mf.chi1 > 1 and 0 < mf.c_star < 1
    z, w = np.polynomial.hermite_e.hermegauss(120)  # at q* ~ 1 this rule is exact to ~1e-10
    z1, z2, weights = z[:, None], z[None, :], np.outer(w, w) / w.sum() ** 2
    u1 = math.sqrt(mf.q_star) * z1

    def u2(c: float) -> np.ndarray:
        return math.sqrt(mf.q_star) * (c * z1 + math.sqrt(1 - c * c) * z2)

    c_map = lambda c: (2.5 * np.sum(weights * np.tanh(u1) * np.tanh(u2(c))) + 0.05) / mf.q_star  # noqa: E731
    c_star = optimize.brentq(lambda c: c_map(c) - c, 0.01, 0.99, xtol=1e-14)
    chi_c = 2.5 * np.sum(weights * np.cosh(u1) ** -2 * np.cosh(u2(c_star)) ** -2)
    assert mf.c_star == pytest.approx(c_star, abs=1e-9)
    assert mf.xi_c == pytest.approx(-1 / math.log(chi_c), rel=1e-7)
    assert (mf.c_star, mf.xi_c) == pytest.approx((0.44680, 11.7956), abs=1e-4)


def test_xi_q_is_the_slope_of_the_length_map():
    mf = theory.predict(TANH, 1.5, 0.05, depth=2)
    length = lambda q: 1.5 * _gaussian_mean(lambda u: math.tanh(u) ** 2, q) + 0.05  # noqa: E731
    h = 1e-5
    slope = (length(mf.q_star + h) - length(mf.q_star - h)) / (2 * h)
    assert mf.xi_q == pytest.approx(-1 / math.log(slope), rel=1e-6)


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_every_elementwise_activation_gets_finite_numbers_at_its_own_gain(name):
    cfg = ActivationConfig(name)
    mf = theory.predict(cfg, activation_gain(cfg) ** 2, 0.01, depth=4)
    assert all(math.isfinite(v) and v > 0 for v in (*mf.q, *mf.act_std, mf.grad_norm_ratio, mf.chi1))
    assert 0.0 <= mf.c_star <= 1.0 and mf.xi_c > 0


def test_maxout_is_not_elementwise():
    with pytest.raises(ValueError, match="maxout"):
        theory.predict(ActivationConfig("maxout"), 1.0, 0.0, depth=2)


# --- wide random networks -------------------------------------------------------------------------


def _wide_net(act: str, sigma_w2: float, sigma_b2: float, depth: int, width: int = 1500, batch: int = 32):
    """One float64 net of N(0, sigma_w2 / width) weights: its inputs' q0, each layer's measured q,
    and ||dL/dh_1|| / ||dL/dh_L|| for a Gaussian gradient at the top."""
    g = torch.Generator().manual_seed(0)
    normal = lambda *shape: torch.randn(*shape, generator=g).double()  # noqa: E731  (float32 draws: 3x faster)
    phi = build_activation(ActivationConfig(act)).double()
    x = normal(batch, width).requires_grad_(True)
    h, pre_acts = x, []
    for layer in range(depth):
        weight, bias = normal(width, width) * math.sqrt(sigma_w2 / width), normal(width) * math.sqrt(sigma_b2)
        pre_acts.append((phi(h) if layer else h) @ weight.T + bias)
        pre_acts[-1].retain_grad()
        h = pre_acts[-1]
    (pre_acts[-1] * normal(batch, width)).sum().backward()
    measured_q = [float(p.detach().square().mean()) for p in pre_acts]
    return float(x.detach().square().mean()), measured_q, float(pre_acts[0].grad.norm() / pre_acts[-1].grad.norm())


@pytest.mark.parametrize(
    "act, sigma_w2, sigma_b2, depth, width",
    [
        ("tanh", 1.76, 0.05, 5, 1500),  # critical
        ("tanh", 3.0, 0.0, 5, 1500),  # chaotic
        ("elu", 1.5, 0.1, 5, 1500),
        # At sigma_w^2 = 2 ReLU's length map is neutral: finite-width deviations of q are not damped
        # and add up (q_5 over 6 seeds at width 1500: -17% to +6%; q_3 at width 2000: +-2% std).
        ("relu", 2.0, 0.0, 3, 2000),
    ],
)
def test_wide_random_nets_follow_the_predicted_q_and_gradient_ratio(act, sigma_w2, sigma_b2, depth, width):
    # Seeds 0-5 of the depth-5 nets: q_5 within 3% (tanh), 4.5% (elu); the gradient ratio within 2%.
    q0, measured_q, measured_ratio = _wide_net(act, sigma_w2, sigma_b2, depth, width)
    mf = theory.predict(ActivationConfig(act), sigma_w2, sigma_b2, depth=depth, q0=q0)
    assert measured_q == pytest.approx(mf.q, rel=0.05)
    assert measured_ratio == pytest.approx(mf.grad_norm_ratio, rel=0.04)


# --- trial models -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.width=1024", "model.depth=4", "activation=tanh"],
        ["model.width=1024", "model.depth=4", "activation=tanh", "initializer=orthogonal", "scale=1.5"],
        ["model=cnn", "model.channels=128", "model.depth=4", "activation=tanh"],
        ["model=cnn", "model.channels=128", "model.depth=4", "activation=tanh", "initializer=delta_orthogonal"],
    ],
)
def test_trial_predictions_match_what_the_probe_measures(overrides):
    # Digits: z-scored, strongly correlated samples; an 8x8 CNN loses 16-31% of its taps to padding,
    # except with delta-orthogonal kernels (centre tap only), whose first conv's channels all
    # carry one pixel, and whose zero pixels stay exactly zero (q = 0).
    prep = prepare_trial(compose(overrides))
    x, y = prep.splits.x_train[:256], prep.splits.y_train[:256]
    predicted = theory.trial_predictions(prep.model, prep.cfg, x)
    measured = diagnostics.probe(prep.model, x, y)
    assert predicted["theory_grad_norm_ratio"] == pytest.approx(measured.summary["grad_norm_ratio"], rel=0.03)
    assert predicted["theory_act_std_ratio"] == pytest.approx(measured.summary["act_std_ratio"], rel=0.03)
    assert predicted["theory_act_std_last"] == pytest.approx(measured.layers[-1]["act_std"], rel=0.03)


def test_trial_predictions_read_sigma_w2_and_sigma_b2_off_the_weights():
    orthogonal = ["model.width=64", "initializer=orthogonal", "initializer.gain=1.3"]
    prep = prepare_trial(compose([*orthogonal, "initializer.bias=constant", "initializer.bias_value=0.2"]))
    predicted = theory.trial_predictions(prep.model, prep.cfg)
    assert predicted["theory_sigma_w2"] == pytest.approx(1.3**2, rel=1e-6)  # square: exactly gain^2
    assert predicted["theory_sigma_b2"] == pytest.approx(0.2**2, rel=1e-6)  # a constant's mean square
    uniform = prepare_trial(compose(["model.width=512", "initializer=uniform", "initializer.bound=0.1"]))
    expected = 512 * 0.1**2 / 3  # fan_in * Var(U(-a, a))
    assert theory.trial_predictions(uniform.model, uniform.cfg)["theory_sigma_w2"] == pytest.approx(expected, rel=0.02)


def test_trial_predictions_name_every_metric_and_mark_no_critical_point_nan():
    prep = prepare_trial(compose(["model.width=32", "initializer.bias=constant", "initializer.bias_value=0.3"]))
    predicted = theory.trial_predictions(prep.model, prep.cfg)  # relu with a bias: never critical
    named = {"q_star", "chi1", "c_star", "xi_q", "xi_c", "trainable_depth", "critical_sigma_w2", "sigma_w2"}
    named |= {"sigma_b2", "grad_norm_ratio", "act_std_last", "act_std_ratio"}
    assert set(predicted) == {f"theory_{name}" for name in named}
    assert math.isnan(predicted["theory_critical_sigma_w2"])
    assert all(isinstance(v, float) for v in predicted.values())


@pytest.mark.parametrize(
    "overrides",
    [
        ["normalization=batch"],
        ["normalization=layer"],
        ["model.residual=true"],
        ["model=rnn", "dataset=digits"],
        ["activation=maxout"],
        ["model=resnet", "model.depth=8"],
    ],
)
def test_trial_predictions_are_empty_where_the_theory_does_not_apply(overrides):
    prep = prepare_trial(compose(["model.width=16", "model.depth=2", *overrides]))
    assert theory.trial_predictions(prep.model, prep.cfg) == {}
