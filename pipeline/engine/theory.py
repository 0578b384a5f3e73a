"""Mean-field signal propagation at initialization (Poole et al. 2016; Schoenholz et al. 2017).

In a wide plain network whose weights have second moment sigma_w^2 / fan_in and whose biases have
second moment sigma_b^2, each pre-activation is Gaussian over the random weights, with a second
moment q that layers map deterministically:

- length map: q_l = sigma_w^2 E[phi(sqrt(q_{l-1}) z)^2] + sigma_b^2 (z ~ N(0, 1)), fixed point q*;
- chi_1 = sigma_w^2 E[phi'(sqrt(q*) z)^2]: < 1 ordered (gradients vanish), > 1 chaotic (explode);
- correlation map of two inputs at q*, fixed point c*, and the depth scales xi_q, xi_c;
- the trainable depth 6 xi_c and the critical sigma_w^2 (chi_1 = 1) for a given sigma_b^2.

Expectations are quadrature sums over the activation's own torch module, evaluated in float64
(derivatives by autograd), so every elementwise activation of ``ACTIVATIONS`` gets its numbers;
the nodes are Gauss-Legendre panels rather than Gauss-Hermite, which loses tanh's bend once q is
large (``_gaussian_nodes``). ``trial_predictions`` reads sigma_w^2 and sigma_b^2 off an
initialized model and predicts what ``diagnostics.probe`` measures. docs/theory.md gives the
formulas, conventions and where the theory applies.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy import interpolate, optimize
from torch import nn

from pipeline.config import ActivationConfig, Config
from pipeline.config.catalog import MODELS, NORMALIZATIONS, activation_widening
from pipeline.engine.nn.activations import build_activation

_Q_FLOOR, _Q_CEIL = 1e-12, 1e12  # where the limits of q* = 0 and q* = inf are evaluated
_Q_TINY = 1e-200  # q = 0 (no signal) is evaluated here: phi(0) and phi'(0+) as limits
_MARGINAL = 1e-9  # a multiplier within this of 1 is critical: its depth scale is infinite
_ROUNDING = 1e-12  # relative: a difference of two quadratures of q's size within this is rounding
_Q_GRID = np.logspace(-8, 8, 161)  # where critical_sigma_w2 looks for the critical q*
# Quadrature panels: every activation bends or kinks near 0 (|u| <= 16), at multiples of 0.5 for
# the kinked ones (ReLU at 0, ReLU6 at 6); the Gaussian's bulk is +-10 std.
_FINE_EDGES = np.arange(-16.0, 16.5, 0.5)
_BULK_PANELS = 40
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
_CONVS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d}


@dataclass(frozen=True)
class MeanField:
    """The mean-field numbers of one (activation, sigma_w^2, sigma_b^2) and one depth.

    ``q``, ``act_std`` and ``grad_norm_ratio`` follow the layers from the input's second moment;
    the others describe the stationary map (math.inf where a depth scale diverges or q* does).
    """

    sigma_w2: float
    sigma_b2: float
    q_star: float  # fixed point of the length map reached from the first layer (0, finite or inf)
    chi1: float  # sigma_w^2 E[phi'(u)^2], u ~ N(0, q*)
    c_star: float  # stable fixed point of the correlation map (1 in the ordered phase)
    xi_q: float  # -1 / log(slope of the length map at q*)
    xi_c: float  # -1 / log(sigma_w^2 E[phi'(u1) phi'(u2)]) at c*; inf at criticality
    trainable_depth: float  # 6 xi_c (Schoenholz et al. 2017)
    critical_sigma_w2: Optional[float]  # chi_1 = 1 at this sigma_b^2; None where there is none
    q: tuple[float, ...]  # pre-activation second moment of hidden layers 1..L
    act_std: tuple[float, ...]  # std of each hidden layer's output phi(h): diagnostics' act_std
    grad_norm_ratio: float  # ||dL/dh_1|| / ||dL/dh_L||: diagnostics' grad_norm_ratio

    @property
    def pre_act_std(self) -> tuple[float, ...]:
        return tuple(math.sqrt(q) for q in self.q)


class _Moments(NamedTuple):
    """Gaussian expectations at one q, u = sqrt(q) z."""

    mean: float  # E[phi(u)]
    square: float  # E[phi(u)^2]
    slope2: float  # E[phi'(u)^2]
    dsquare: float  # d E[phi(u)^2] / dq = E[phi(u) phi'(u) u] / q = E[phi'^2 + phi phi''] (Stein's lemma)


class _Phi:
    """An elementwise activation on float64 arrays, with its derivative by autograd."""

    def __init__(self, cfg: ActivationConfig) -> None:
        if activation_widening(cfg) != 1:
            raise ValueError(f"activation={cfg.name} is not elementwise: mean-field theory does not apply")
        self.module = build_activation(cfg).double()
        self.key = repr(cfg)  # the activation and its options: what phi is

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)).requires_grad_(True)
        y = self.module(t)
        (dy,) = torch.autograd.grad(y.sum(), t)
        return y.detach().numpy(), dy.numpy()


@functools.cache
def _legendre(points: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(points)


def _gaussian_nodes(means: np.ndarray, stds: np.ndarray, points: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes v and weights w, one row per (mean, std) pair, with sum_j w[i, j] f(v[i, j]) = E[f(v)]
    for v ~ N(means[i], stds[i]^2): Gauss-Legendre panels over the Gaussian's bulk, split at the
    fine edges near 0 (clipped to the bulk: a panel may have zero width), so that an activation's
    bends are resolved whatever the std. Gauss-Hermite nodes in z are not: at q = 10 a 100-node
    rule misses E[tanh'(u)^2] by 2%, at q = 100 by 88%, as sqrt(q) z steps over tanh's bend."""
    means, stds = (a[:, None] for a in np.broadcast_arrays(np.atleast_1d(means), np.atleast_1d(stds)))
    low, high = means - 10.0 * stds, means + 10.0 * stds
    bulk = low + (high - low) * np.linspace(0.0, 1.0, _BULK_PANELS + 1)
    edges = np.sort(np.concatenate([bulk, np.clip(_FINE_EDGES, low, high)], axis=1), axis=1)
    # (rows, points, panels): the panels innermost, as numpy's loops run fast only over a long last axis.
    half, middle = np.diff(edges, axis=1)[:, None] / 2, (edges[:, 1:] + edges[:, :-1])[:, None] / 2
    x, w = (a[:, None] for a in _legendre(points))
    nodes = half * x
    nodes += middle
    nodes = nodes.reshape(len(means), -1)
    # In place: a pair's inner rule has ~400k nodes, and a fresh array of that size costs more
    # (its pages first touched) than the arithmetic.
    weights = np.subtract(nodes, means)
    weights /= stds
    np.square(weights, out=weights)
    weights *= -0.5
    np.exp(weights, out=weights)
    weights /= stds * math.sqrt(2.0 * math.pi)
    weights *= (half * w).reshape(len(means), -1)
    return nodes, weights


def _moments(phi: _Phi, q: float) -> _Moments:
    return _Moments(*(float(v) for v in _moment_table(phi, np.array([q]))[0]))


def _moment_table(phi: _Phi, qs: np.ndarray) -> np.ndarray:
    """(len(qs), 4): the ``_Moments`` at each q, from one evaluation of phi; at q = 0 (no signal at
    all) phi(0) and the derivative autograd gives at 0, as a measured net has them."""
    qs = np.asarray(qs, dtype=np.float64)
    u, w = _gaussian_nodes(0.0, np.sqrt(np.maximum(qs, _Q_TINY)), 8)
    u[qs <= 0], w[qs <= 0] = 0.0, 1.0 / u.shape[1]
    f, df = phi(u)
    safe = np.where(qs > 0, qs, 1.0)
    table = [(w * f).sum(1), (w * f**2).sum(1), (w * df**2).sum(1), (w * f * df * u).sum(1) / safe]
    table[3] = np.where(qs > 0, table[3], table[2])  # d E[phi^2] / dq at 0: phi'(0)^2 (phi(0) phi''(0) aside)
    return np.stack(table, axis=1)


def _pair(phi: _Phi, q: float, c: float) -> tuple[float, float]:
    """(E[phi(u1) phi(u2)], E[phi'(u1) phi'(u2)]) for u1, u2 ~ N(0, q) with correlation c in [0, 1]:
    over u1, the expectation over u2 given u1 (mean c u1, std sqrt(q (1 - c^2)))."""
    u, w = _gaussian_nodes(0.0, math.sqrt(q), 6)
    f1, df1 = phi(u[0])
    if c == 0.0:  # independent: each expectation factors (c* of an odd phi without bias)
        return float(w[0] @ f1) ** 2, float(w[0] @ df1) ** 2
    spread = math.sqrt(q * max(1.0 - c * c, 0.0))
    if spread == 0.0:
        f2, df2 = phi(c * u[0])
        return float(w[0] @ (f1 * f2)), float(w[0] @ (df1 * df2))
    v, given = _gaussian_nodes(c * u[0], spread, 6)  # (u1 nodes, u2 nodes)
    f2, df2 = phi(v)
    return float(w[0] @ (f1 * (given * f2).sum(1))), float(w[0] @ (df1 * (given * df2).sum(1)))


# --- the length map and its fixed point ---------------------------------------------------------


def _length_gap(phi: _Phi, sigma_w2: float, sigma_b2: float) -> Callable[[float], float]:
    return lambda q: float(_length_gaps(phi, sigma_w2, sigma_b2, np.array([q]))[0])


def _length_gaps(phi: _Phi, sigma_w2: float, sigma_b2: float, qs: np.ndarray) -> np.ndarray:
    """How far the length map moves each q: sigma_w^2 E[phi^2] + sigma_b^2 - q."""
    return sigma_w2 * _moment_table(phi, qs)[:, 1] + sigma_b2 - qs


def _q_star(phi: _Phi, sigma_w2: float, sigma_b2: float, start: float) -> float:
    """The fixed point the length map reaches from ``start``: 0, finite, or math.inf.

    A map that keeps ``start`` (ReLU at sigma_w^2 = 2, sigma_b = 0: every q is fixed) keeps it.
    """
    gap = _length_gap(phi, sigma_w2, sigma_b2)
    start = max(start, _Q_FLOOR)
    moved = gap(start)
    if abs(moved) <= 1e-12 * start:
        return start
    if moved < 0:
        return _root_below(gap, start)
    return _root_above(gap, start, functools.partial(_length_gaps, phi, sigma_w2, sigma_b2))


def _root_below(gap: Callable[[float], float], start: float) -> float:
    if gap(_Q_FLOOR) <= 0:  # q shrinks all the way down: q* = 0 (tanh with sigma_b = 0, sigma_w <= 1)
        return 0.0
    return optimize.brentq(gap, _Q_FLOOR, start, xtol=_Q_FLOOR * 1e-3, rtol=1e-13)


def _root_above(gap: Callable[[float], float], start: float, gaps: Callable[[np.ndarray], np.ndarray]) -> float:
    """The first root above ``start``, bracketed on the ladder start * 4^k up to _Q_CEIL, whose
    rungs are evaluated together (one call of phi: a growing q often climbs every rung)."""
    rungs = start * 4.0 ** np.arange(math.ceil(math.log(_Q_CEIL / start, 4.0)) + 1)
    below = np.flatnonzero(gaps(rungs[1:]) < 0)
    if not below.size:
        return math.inf  # q grows without bound (ReLU with chi_1 > 1, or sigma_w^2 = 2 and sigma_b > 0)
    return optimize.brentq(gap, rungs[below[0]], rungs[below[0] + 1], rtol=1e-13)


def _evaluated(q: float) -> float:
    """Where to evaluate the map's derivatives: q* itself, or the limit's stand-in for 0 and inf."""
    return min(max(q, _Q_FLOOR), _Q_CEIL)


def _depth_scale(multiplier: float) -> float:
    """-1 / log(multiplier): how many layers a perturbation takes to shrink by e."""
    if multiplier >= 1.0 - _MARGINAL:
        return math.inf
    return 0.0 if multiplier <= 0.0 else -1.0 / math.log(multiplier)


# --- the correlation map and its fixed point ----------------------------------------------------


def _c_star(phi: _Phi, sigma_w2: float, sigma_b2: float, q_star: float, chi1: float) -> float:
    """The stable correlation: 1 in the ordered phase, the root below 1 in the chaotic one.

    1 too where q* is 0 or infinite: the net then acts on its inputs as a linear (q -> 0) or
    positively homogeneous (q -> inf, ReLU-like) map, whose correlation map keeps c = 1 at slope 1.
    """
    if chi1 <= 1.0 + _MARGINAL or not 0.0 < q_star < math.inf:
        return 1.0
    gap = lambda c: (sigma_w2 * _pair(phi, q_star, c)[0] + sigma_b2) / q_star - c  # noqa: E731
    for delta in 10.0 ** -np.arange(1, 9):  # step off c = 1 until the map pulls c down (slope chi1 > 1)
        if gap(1.0 - delta) < 0:
            return _c_root(gap, 1.0 - delta)
    return 1.0


def _c_root(gap: Callable[[float], float], high: float) -> float:
    # gap(0) = (sigma_w^2 E[phi]^2 + sigma_b^2) / q >= 0: exactly 0 for an odd phi without bias.
    if gap(0.0) <= 1e-14:
        return 0.0
    return optimize.brentq(gap, 0.0, high, xtol=1e-13)


# --- layer by layer ------------------------------------------------------------------------------


class _Trajectory(NamedTuple):
    """Hidden layers 1..L: q (pre-activations), the outputs' std, and ||dL/dh_1|| / ||dL/dh_L||."""

    q: tuple[float, ...]
    act_std: tuple[float, ...]
    grad_norm_ratio: float


def _trajectory(phi: _Phi, sigma_w2s: Sequence[float], sigma_b2s: Sequence[float], q0: float) -> _Trajectory:
    """One input of per-feature second moment q0 through the layers (one sigma pair each)."""
    qs = [sigma_w2s[0] * q0 + sigma_b2s[0]]
    for sigma_w2, sigma_b2 in zip(sigma_w2s[1:], sigma_b2s[1:]):
        qs.append(sigma_w2 * _moments(phi, qs[-1]).square + sigma_b2)
    act_std = tuple(_output_std(phi, q) for q in qs)
    return _Trajectory(tuple(qs), act_std, _grad_norm_ratio(phi, sigma_w2s, qs))


def _output_std(phi: _Phi, q: float) -> float:
    """Std of phi(u), u ~ N(0, q), pooled over units and samples as diagnostics' act_std is."""
    if not math.isfinite(q):
        return math.inf
    m = _moments(phi, q)
    return math.sqrt(max(m.square - m.mean**2, 0.0))


def _grad_norm_ratio(phi: _Phi, sigma_w2s: Sequence[float], qs: Sequence[float]) -> float:
    """||dL/dh_1|| / ||dL/dh_L|| over pre-activations h: backprop multiplies the squared norm by
    fan_in Var(W_{l+1}) E[phi'(h_l)^2] from layer l+1 down to l (gradient independence)."""
    squared = 1.0
    for sigma_w2, q in zip(sigma_w2s[1:], qs[:-1]):
        squared *= sigma_w2 * _moments(phi, q).slope2
    return math.sqrt(squared)


# --- the public face -----------------------------------------------------------------------------


def predict(activation: ActivationConfig, sigma_w2: float, sigma_b2: float, depth: int, q0: float = 1.0) -> MeanField:
    """The mean-field numbers of a plain net of ``depth`` hidden layers with weights of variance
    sigma_w2 / fan_in and biases of variance sigma_b2.

    Args:
        activation: An elementwise activation of ``ACTIVATIONS`` (not maxout).
        sigma_w2: fan_in times the weights' second moment, every hidden layer.
        sigma_b2: The biases' second moment.
        depth: Hidden layers L >= 1.
        q0: The input's second moment per feature (1 for z-scored inputs).

    Returns:
        The stationary numbers, and the layers' q, output std and gradient-norm ratio.

    Raises:
        ValueError: A non-elementwise activation (maxout).
    """
    phi = _Phi(activation)
    path = _trajectory(phi, [sigma_w2] * depth, [sigma_b2] * depth, q0)
    return _mean_field(phi, sigma_w2, sigma_b2, path)


def _mean_field(phi: _Phi, sigma_w2: float, sigma_b2: float, path: _Trajectory) -> MeanField:
    """The stationary numbers of the repeated map (sigma_w2, sigma_b2) beside a trajectory."""
    fixed = _stationary(phi, sigma_w2, sigma_b2, path.q[0])
    return MeanField(sigma_w2, sigma_b2, **fixed, q=path.q, act_std=path.act_std, grad_norm_ratio=path.grad_norm_ratio)


def _stationary(phi: _Phi, sigma_w2: float, sigma_b2: float, start: float) -> dict:
    q_star = _q_star(phi, sigma_w2, sigma_b2, start)
    q = _evaluated(q_star)
    m = _moments(phi, q)
    chi1 = sigma_w2 * m.slope2
    c_star = _c_star(phi, sigma_w2, sigma_b2, q_star, chi1)
    xi_c = _depth_scale(sigma_w2 * _pair(phi, q, c_star)[1])
    return {
        "q_star": q_star,
        "chi1": chi1,
        "c_star": c_star,
        "xi_q": _depth_scale(sigma_w2 * m.dsquare),  # the length map's slope at q*
        "xi_c": xi_c,
        "trainable_depth": 6.0 * xi_c,
        "critical_sigma_w2": _critical(phi, sigma_b2),
    }


def critical_sigma_w2(activation: ActivationConfig, sigma_b2: float) -> Optional[float]:
    """The sigma_w^2 at which chi_1 = 1 for this sigma_b^2 (the edge of chaos), or None.

    Along the critical line sigma_w^2 = 1 / E[phi'^2] and, from the fixed point,
    sigma_b^2 = q* - E[phi^2] / E[phi'^2] (all at q*): a root in q* of the second, as Poole et al.
    draw the line. None where the line never reaches ``sigma_b2``: ReLU with sigma_b > 0 (there
    q* is infinite at chi_1 = 1).
    """
    return _critical(_Phi(activation), sigma_b2)


def _critical(phi: _Phi, sigma_b2: float) -> Optional[float]:
    """``critical_sigma_w2``, remembered per (activation, sigma_b^2): a study's trials share a few
    (a trial's scale moves its sigma_w^2 only), and the root search is ~60% of a small trial's
    predictions."""
    key = (phi.key, sigma_b2)
    if key not in _CRITICAL:
        if len(_CRITICAL) >= _CRITICAL_KEPT:  # random biases: a new sigma_b^2 every trial
            _CRITICAL.clear()
        _CRITICAL[key] = _find_critical(phi, sigma_b2)
    return _CRITICAL[key]


_CRITICAL: dict[tuple[str, float], Optional[float]] = {}
_CRITICAL_KEPT = 256


def _find_critical(phi: _Phi, sigma_b2: float) -> Optional[float]:
    gaps = _critical_biases(phi, _Q_GRID) - sigma_b2
    # A gap within rounding of q - E[phi^2] / E[phi'^2] has no sign (tanh's at sigma_b = 0 and q
    # = 1e-8 is +-2e-24): the crossing is sought between the nearest gaps that have one.
    signed = np.flatnonzero(np.abs(gaps) > _ROUNDING * _Q_GRID)
    for i, j in itertools.pairwise(signed):
        if gaps[i] * gaps[j] < 0:
            gap = lambda q: float(_critical_biases(phi, np.array([q]))[0]) - sigma_b2  # noqa: E731
            q = optimize.brentq(gap, _Q_GRID[i], _Q_GRID[j], rtol=1e-13)
            return 1.0 / _moments(phi, q).slope2
    if abs(gaps[0]) <= 1e-9:  # the line ends at q* -> 0 (tanh at sigma_b = 0), or is flat (ReLU)
        return 1.0 / _moments(phi, _Q_FLOOR).slope2
    return None


def _critical_biases(phi: _Phi, qs: np.ndarray) -> np.ndarray:
    """sigma_b^2 = q - E[phi^2] / E[phi'^2] where the critical line has q* = q (NaN: no slope)."""
    table = _moment_table(phi, qs)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(table[:, 2] > 0, qs - table[:, 1] / table[:, 2], np.nan)


# --- a trial's model -----------------------------------------------------------------------------


def applies(model: nn.Module, cfg: Config) -> bool:
    """Whether the plain mean-field theory describes this built model: an MLP or CNN of plain
    blocks (Linear/Conv, no normalization, no residual link) with an elementwise activation."""
    plain = cfg.model.name in MODELS and MODELS.canonical(cfg.model.name) in ("mlp", "cnn")
    plain = plain and not cfg.model.residual and NORMALIZATIONS.canonical(cfg.normalization.name) == "none"
    if not plain or activation_widening(cfg.activation) != 1:
        return False
    return all(_plain_block(block) for block in getattr(model, "blocks", [None]))


def _plain_block(block: Optional[nn.Module]) -> bool:
    layer, norm = getattr(block, "layer", None), getattr(block, "norm", None)
    return isinstance(layer, _LAYERS) and isinstance(norm, nn.Identity) and not getattr(block, "residual", True)


def layer_moments(model: nn.Module) -> tuple[list[float], list[float]]:
    """Per hidden layer, fan_in * mean(W^2) and mean(b^2): sigma_w^2 and sigma_b^2 as initialized."""
    sigma_w2s, sigma_b2s = [], []
    for block in model.blocks:
        weight, bias = block.layer.weight.detach().double(), block.layer.bias
        sigma_w2s.append(weight[0].numel() * float(weight.square().mean()))  # fan_in = in * prod(kernel)
        sigma_b2s.append(0.0 if bias is None else float(bias.detach().double().square().mean()))
    return sigma_w2s, sigma_b2s


def trial_predictions(model: nn.Module, cfg: Config, probe: Optional[torch.Tensor] = None) -> dict[str, float]:
    """The mean-field predictions for an initialized trial model, as ``theory_*`` metrics.

    sigma_w^2 and sigma_b^2 are read off the initialized weights, not the initializer's formula,
    so every scheme (orthogonal, uniform, truncated, scaled, LSUV, a pretrained start) gets its
    prediction without a table of schemes: fan_in * mean(W^2) and mean(b^2) per hidden layer.
    Second moments about zero equal the variances for the zero-mean schemes, and are what enters
    the length map where they differ (a constant bias b adds b^2 to q, its variance is 0). The
    layers' own values drive the trajectory (the first layer's fan_in is the input's); their mean
    over layers 2..L gives the stationary numbers (q*, chi_1, xi_c, the critical sigma_w^2).

    Args:
        model: A built, initialized model (``model.blocks``).
        cfg: Its trial config.
        probe: The inputs diagnostics probe, (B, *input_shape): each sample (and each position
            of a CNN) is followed apart (``_field_trajectory``). Without them, one input of
            second moment 1 per feature (z-scored data) through dense layers.

    Returns:
        ``theory_*`` floats (NaN critical sigma_w^2 where there is none), or {} where the theory
        does not apply (``applies``: normalization, residual links, rnn/gru, maxout, other models).
    """
    if not applies(model, cfg):
        return {}
    phi, (sigma_w2s, sigma_b2s) = _Phi(cfg.activation), layer_moments(model)
    repeated = slice(1, None) if len(sigma_w2s) > 1 else slice(None)  # layers 2..L: the repeated map
    stationary = float(np.mean(sigma_w2s[repeated])), float(np.mean(sigma_b2s[repeated]))
    if probe is None:
        path = _trajectory(phi, sigma_w2s, sigma_b2s, 1.0)
    else:
        layers = [block.layer for block in model.blocks]
        path = _field_trajectory(phi, layers, sigma_w2s, sigma_b2s, probe.detach().cpu().double())
    return metrics(_mean_field(phi, *stationary, path))


def _field_trajectory(
    phi: _Phi, layers: list[nn.Module], sigma_w2s: list[float], sigma_b2s: list[float], probe: torch.Tensor
) -> _Trajectory:
    """The length map for each probe sample, and in a CNN for each position (Xiao et al. 2018):
    a conv's output q at a position averages its window's E[phi^2] (``_spread``), zero padding
    adding nothing, so border positions see less signal. Backward, each sample's squared gradient flows through
    the adjoint of the same windows; the loss's gradient is taken alike for every sample.

    The first layer sums fan_in inputs of this sample, so its pre-activation is Gaussian over the
    weights given the sample: the non-Gaussian mix over samples and positions is kept, not
    flattened into one q0 (in a CNN on MNIST-1D the first conv sums 3 inputs).
    """
    fields = [sigma_w2s[0] * _spread(layers[0], _input_field(layers[0], probe)) + sigma_b2s[0]]
    moments = [_field_moments(phi, fields[0])]
    for layer, sigma_w2, sigma_b2 in zip(layers[1:], sigma_w2s[1:], sigma_b2s[1:]):
        fields.append(sigma_w2 * _spread(layer, moments[-1].square) + sigma_b2)
        moments.append(_field_moments(phi, fields[-1]))
    act_std = tuple(math.sqrt(max(float(m.square.mean() - m.mean.mean() ** 2), 0.0)) for m in moments)
    q = tuple(float(field.mean()) for field in fields)
    return _Trajectory(q, act_std, _field_grad_norm_ratio(layers, sigma_w2s, moments))


def _field_grad_norm_ratio(layers: list[nn.Module], sigma_w2s: list[float], moments: list[_Moments]) -> float:
    """||dL/dh_1|| / ||dL/dh_L|| from each unit's mean squared gradient, per sample and position."""
    top = energy = moments[-1].slope2  # dL/dh_L = phi'(h_L) * (the same upstream gradient everywhere)
    for layer, sigma_w2, below in zip(layers[:0:-1], sigma_w2s[:0:-1], moments[-2::-1]):
        energy = sigma_w2 * below.slope2 * _spread_adjoint(layer, energy, below.slope2)
    return _ratio(math.sqrt(float(energy.sum())), math.sqrt(float(top.sum())))


def _input_field(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per sample (and position, for a conv) the input's second moment per feature."""
    if type(layer) in _CONVS:
        return x.square().mean(dim=1)  # (B, C, *positions) -> (B, *positions)
    return x.square().flatten(1).mean(dim=1)  # (B, *features) -> (B,)


def _spread(layer: nn.Module, field: torch.Tensor) -> torch.Tensor:
    """What a layer's outputs see of its inputs' second moments, per unit of sigma_w^2: a dense
    layer averages all its inputs, a conv its window, weighting each tap by its share of the
    weights' energy (1/k for random weights, the centre alone for delta-orthogonal kernels);
    zero padding counts as zero."""
    conv = _CONVS.get(type(layer))
    if conv is None:
        return field
    energy = layer.weight.detach().double().cpu().square().sum(dim=(0, 1))  # (*kernel)
    total = float(energy.sum())
    kernel = (energy / total if total > 0 else torch.full_like(energy, 1.0 / energy.numel()))[None, None]
    return conv(field.unsqueeze(1), kernel, None, layer.stride, layer.padding, layer.dilation).squeeze(1)


def _spread_adjoint(layer: nn.Module, energy: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The transpose of ``_spread``: where each output's squared gradient lands on the inputs."""
    if type(layer) not in _CONVS:
        return energy
    field = torch.zeros_like(like, requires_grad=True)
    (adjoint,) = torch.autograd.grad(_spread(layer, field), field, energy)
    return adjoint


def _field_moments(phi: _Phi, field: torch.Tensor) -> _Moments:
    """``_moments`` at every q of a field (tensors of its shape): a cubic spline in log q through
    exact evaluations, 16 a decade, over the field's positive values down to 1e-12 of the largest
    (the rest evaluated there); q = 0 exactly (a window of zeros and no bias) at 0."""
    q = field.clamp(max=_Q_CEIL).numpy()
    values = np.broadcast_to(_moment_table(phi, np.zeros(1))[0], (*q.shape, 4)).copy()
    positive = q > 0
    if positive.any():
        high = float(q[positive].max())
        low = max(float(q[positive].min()), high * 1e-12)
        grid = np.geomspace(low, high, int(16 * math.log10(high / low)) + 2)
        logs = np.log(np.maximum(q[positive], low))
        table = _moment_table(phi, grid)
        values[positive] = interpolate.CubicSpline(np.log(grid), table)(logs) if high > low * (1 + 1e-9) else table[0]
    return _Moments(*(torch.from_numpy(np.ascontiguousarray(values[..., i])) for i in range(4)))


def metrics(mf: MeanField) -> dict[str, float]:
    """``theory_*`` metrics of a ``MeanField``; those diagnostics measure too say which."""
    numbers = {
        "sigma_w2": mf.sigma_w2,
        "sigma_b2": mf.sigma_b2,
        "q_star": mf.q_star,
        "chi1": mf.chi1,
        "c_star": mf.c_star,
        "xi_q": mf.xi_q,
        "xi_c": mf.xi_c,
        "trainable_depth": mf.trainable_depth,
        "critical_sigma_w2": math.nan if mf.critical_sigma_w2 is None else mf.critical_sigma_w2,
        "grad_norm_ratio": mf.grad_norm_ratio,  # init_grad_norm_ratio
        "act_std_last": mf.act_std[-1],  # the last row's act_std at epoch 0
        "act_std_ratio": _ratio(mf.act_std[-1], mf.act_std[0]),  # init_act_std_ratio
    }
    return {f"theory_{name}": float(value) for name, value in numbers.items()}


def _ratio(num: float, den: float) -> float:
    # As diagnostics' ratios: a net with no signal at all (0/0) reports 0, not NaN.
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den
