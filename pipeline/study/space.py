"""Study spaces: Hydra sweep expressions -> Optuna distributions, and trial params -> overrides.

A space is a flat map from config key to expression (``conf/space/<name>.yaml``), written in the
grammar of Hydra's sweepers and parsed with Hydra's own override parser:

- ``choice(a, b, c)`` -> categorical
- ``range(start, stop[, step])`` -> integers start, start+step, ... < stop (Python's range)
- ``interval(low, high)`` -> uniform float (integers if both ends are integers)
- ``tag(log, interval(low, high))`` -> log-uniform
- a plain value -> fixed for every trial

Some keys only matter for some values of another axis (``activation.slope`` only for
``leaky_relu``); ``CONDITIONS`` lists them, and they are sampled only when they matter.
Every error here is a ``ConfigError`` raised before Ray starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from pipeline.config import ConfigError, one_line

GROUP_AXES = ("initializer", "activation", "normalization", "model", "dataset", "optimizer")

#: key -> (the axis it depends on, the values of that axis for which it is sampled)
CONDITIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "activation.slope": ("activation", ("leaky_relu",)),
    "normalization.groups": ("normalization", ("group",)),
    "initializer.std": ("initializer", ("normal",)),
    "initializer.bound": ("initializer", ("uniform",)),
    "initializer.value": ("initializer", ("constant",)),
    "initializer.mode": ("initializer", ("kaiming_normal", "kaiming_uniform", "variance_scaling")),
    "initializer.factor": ("initializer", ("variance_scaling",)),
    "initializer.distribution": ("initializer", ("variance_scaling",)),
    "model.width": ("model", ("mlp",)),
    "model.parametrization": ("model", ("mlp",)),
    "model.base_width": ("model", ("mlp",)),
    "model.residual": ("model", ("mlp", "cnn")),
    "model.channels": ("model", ("cnn",)),
    "model.residual_init": ("model", ("resnet",)),
    "model.width_multiplier": ("model", ("resnet",)),
    "model.features_per_step": ("model", ("rnn", "gru")),
    "initializer.recurrent": ("model", ("rnn", "gru")),
    "activation.pieces": ("activation", ("maxout",)),
    "optimizer.trust_coefficient": ("optimizer", ("lars",)),
}


@dataclass(frozen=True)
class Axis:
    key: str
    distribution: Optional[BaseDistribution]  # None: a fixed value
    fixed: Any = None
    condition: Optional[tuple[str, tuple[str, ...]]] = None


def apply_overrides(space: dict, overrides: list[str]) -> dict:
    """``space.<key>=<expr>`` sets (or adds) an axis; ``~space.<key>`` drops one."""
    space = dict(space)
    for override in overrides:
        if override.startswith("~space."):
            key = override[len("~space.") :].split("=")[0]
            if key not in space:
                raise ConfigError(f"~space.{key}: no such axis in the space; axes: {', '.join(space) or 'none'}")
            del space[key]
        else:
            key, _, expr = override.partition("=")
            space[key.lstrip("+")[len("space.") :]] = expr
    return space


def parse_space(space: dict, config: dict, group_options: dict[str, list[str]]) -> list[Axis]:
    """Check every key and expression against the base ``config``; return the axes in order."""
    if not space:
        raise ConfigError("the study space is empty; choose one with space=<name> or add space.<key>=<expr>")
    valid_keys = _valid_keys(config)
    axes = [_parse_axis(key, str(expr), valid_keys, group_options) for key, expr in space.items()]
    sampled = {axis.key for axis in axes}
    return [_with_condition(axis, sampled) for axis in axes]


def _valid_keys(config: dict) -> set[str]:
    trial_part = {k: v for k, v in config.items() if k not in ("study", "cluster", "space", "tracking")}
    return set(_leaf_keys(trial_part)) | set(GROUP_AXES)


def _leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    """Every leaf key, null-valued ones included (``initializer.recurrent`` is null by default)."""
    keys = []
    for key, value in tree.items():
        keys += _leaf_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return keys


def _parse_axis(key: str, expr: str, valid_keys: set[str], group_options: dict) -> Axis:
    if key not in valid_keys:
        raise ConfigError(f"unknown axis '{key}' in the space; valid: {', '.join(sorted(valid_keys))}")
    value = _parse_expr(key, expr)
    distribution = _distribution(key, value) if _is_sweep(value) else None
    if key in GROUP_AXES:
        _check_group_values(key, distribution.choices if distribution else (value,), group_options[key])
    return Axis(key, distribution, None if distribution else value)


def _parse_expr(key: str, expr: str) -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(f"{key}={expr}").value()
    except Exception as err:
        raise ConfigError(
            f"space.{key}={expr} is not a valid sweep expression ({one_line(err, 200)}); "
            "use choice(a,b), range(1,10), interval(0.1,1) or tag(log, interval(1e-3,1))"
        ) from err


def _is_sweep(value: Any) -> bool:
    from hydra.core.override_parser.types import Sweep

    return isinstance(value, Sweep)


def _distribution(key: str, sweep) -> BaseDistribution:
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    if isinstance(sweep, ChoiceSweep):
        return _choice(key, list(sweep.list))
    if isinstance(sweep, RangeSweep):
        return _range(key, sweep)
    if isinstance(sweep, IntervalSweep):
        return _interval(key, sweep.start, sweep.end, "log" in sweep.tags)
    raise ConfigError(f"space.{key}: unsupported sweep {sweep}; use choice, range or interval")


def _choice(key: str, choices: list) -> CategoricalDistribution:
    if not choices:
        raise ConfigError(f"space.{key}=choice() is empty; give at least one value")
    if len(set(map(repr, choices))) != len(choices):
        raise ConfigError(f"space.{key}: choice{tuple(choices)} repeats a value")
    return CategoricalDistribution(choices)


def _range(key: str, sweep) -> BaseDistribution:
    start, stop, step = sweep.start, sweep.stop, sweep.step
    values = [start + i * step for i in range(max(0, math.ceil((stop - start) / step)))] if step else []
    if not values:
        raise ConfigError(f"space.{key}=range({sweep.start}, {sweep.stop}, {sweep.step}) is empty")
    if all(isinstance(v, int) for v in values):
        return IntDistribution(values[0], values[-1], step=int(sweep.step))
    return CategoricalDistribution(values)


def _interval(key: str, low: float, high: float, log: bool) -> BaseDistribution:
    if low > high:
        raise ConfigError(f"space.{key}=interval({low}, {high}) has low > high")
    if log and low <= 0:
        raise ConfigError(f"space.{key}=tag(log, interval({low}, {high})): a log scale needs low > 0")
    if isinstance(low, int) and isinstance(high, int) and not isinstance(low, bool):
        return IntDistribution(low, high, log=log)
    return FloatDistribution(float(low), float(high), log=log)


def _check_group_values(key: str, values, options: list[str]) -> None:
    for value in values:
        if str(value) not in options:
            raise ConfigError(f"space.{key}: unknown {key} '{value}'; valid: {', '.join(options)}")


def extreme_values(axis: Axis) -> list[Any]:
    """The values that bound what ``axis`` can give: every choice, or an interval's or range's ends."""
    dist = axis.distribution
    if dist is None:
        return [axis.fixed]
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    return [dist.low, dist.high]


def _with_condition(axis: Axis, sampled: set[str]) -> Axis:
    condition = CONDITIONS.get(axis.key)
    if condition is None or condition[0] not in sampled:
        return axis
    return Axis(axis.key, axis.distribution, axis.fixed, condition)


def suggest(trial, axes: list[Axis]) -> dict[str, Any]:
    """Ask ``trial`` (an Optuna trial) for every sampled axis whose condition holds."""
    params: dict[str, Any] = {}
    for axis in axes:
        if axis.distribution is None:
            params[axis.key] = axis.fixed
        elif axis.condition is None or params.get(axis.condition[0]) in axis.condition[1]:
            params[axis.key] = _suggest_one(trial, axis.key, axis.distribution)
    return params


def _suggest_one(trial, key: str, dist: BaseDistribution) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(key, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(key, dist.low, dist.high, log=dist.log)


def grid(axes: list[Axis]) -> dict[str, list]:
    """The grid sampler's search space: every sampled axis must be discrete."""
    space = {}
    for axis in axes:
        dist = axis.distribution
        if isinstance(dist, CategoricalDistribution):
            space[axis.key] = list(dist.choices)
        elif isinstance(dist, IntDistribution) and not dist.log:
            space[axis.key] = list(range(dist.low, dist.high + 1, dist.step))
        elif dist is not None:
            raise ConfigError(f"study.sampler=grid needs choice(...) or range(...) axes; space.{axis.key} is {dist}")
    if any(axis.condition for axis in axes):
        raise ConfigError("study.sampler=grid cannot take conditional axes; drop them or use another sampler")
    return space


def grid_size(axes: list[Axis]) -> int:
    return math.prod(len(values) for values in grid(axes).values())


def to_overrides(params: dict[str, Any]) -> list[str]:
    """Trial params as Hydra overrides of the base config (group axes select a YAML file)."""
    return [f"{key}={_literal(value)}" for key, value in params.items()]


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    return str(value)
