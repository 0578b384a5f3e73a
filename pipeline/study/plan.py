"""A study, planned and checked before any work: config, space, sampler, pruner, storage.

``plan_study`` composes the base config, applies the ``space.*`` overrides itself (Hydra refuses
sweep expressions outside --multirun), parses the space and builds the sampler and pruner. Every
mistake is a ``ConfigError`` here, before Ray starts or any record is written.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution

from pipeline.config import Config, ConfigError, DatasetConfig, check_numbers, config_from_dict, validate
from pipeline.config.composition import (
    compose,
    compose_tree,
    differs_only_at,
    group_options,
    is_value_override,
    plain_copy,
    resolved_template,
    with_subtrees,
    with_values,
    with_values_on,
)
from pipeline.config.registry import Registry
from pipeline.study import objectives, space
from pipeline.study.storage import default_storage

TPE_STARTUP_TRIALS = 10  # TPE draws at random until this many trials have finished (Optuna's default)
WRITERS_FROM_TRIALS = 100  # smaller studies write their runs in the driver (study.writers=null)
GROUP_TREES = 64  # composed trees kept: one per combination of group choices

SAMPLERS: Registry[Callable[[StudyPlan], optuna.samplers.BaseSampler]] = Registry("sampler")
PRUNERS: Registry[Callable[[Config], optuna.pruners.BasePruner]] = Registry("pruner")


@dataclass
class StudyPlan:
    cfg: Config
    base_config: dict  # resolved, with the final space
    hydra_overrides: list[str]
    axes: list[space.Axis]
    storage: str
    n_trials: int
    sampler: Any = None
    pruner: Any = None
    pinned: list[str] = field(default_factory=list)  # command-line overrides of axes the space would sample

    @property
    def prunes(self) -> bool:
        return self.cfg.study.pruner != "none"

    @property
    def writers(self) -> int:
        """Processes that write the MLflow runs (``study.writers``; null: by the study's size)."""
        if self.cfg.study.writers is not None:
            return self.cfg.study.writers
        return 0 if self.n_trials < WRITERS_FROM_TRIALS else min(4, max(1, (os.cpu_count() or 2) // 2))

    def seeds(self) -> list[int]:
        return [self.cfg.seed + i for i in range(self.cfg.study.seeds)]

    def trial_config(self, params: dict, seed: int) -> dict:
        """The resolved config of one trial: the base overrides, then the trial's params, then its seed."""
        config = plain_copy(self._composed(tuple(space.to_overrides(params))))
        config["seed"] = seed
        config["tracking"]["layer_plot"] = self.cfg.study.trial_plots
        return config

    def datasets(self) -> list[DatasetConfig]:
        """The dataset config of each dataset the study's trials can use (one per ``dataset`` choice
        of the space, composed as a trial composes it), for the driver to fetch before Ray starts."""
        axis = next((a for a in self.axes if a.key == "dataset"), None)
        if axis is None:
            return [self.cfg.dataset]
        choices = axis.distribution.choices if axis.distribution is not None else (axis.fixed,)
        return [config_from_dict(self.trial_config({"dataset": name}, self.cfg.seed)).dataset for name in choices]

    def precompose(self) -> None:
        """Compose every combination of the space's group choices now (up to the cache's size).

        The study does this while Ray starts: otherwise the first asks wait ~0.15 s per group
        choice that Hydra composes (~2 ms for one in the composition cache, pipeline/config/compose_cache.py),
        on the dispatch loop's path to the first trials.
        """
        groups = [
            a for a in self.axes if a.key in space.GROUP_AXES and isinstance(a.distribution, CategoricalDistribution)
        ]
        for combo in itertools.islice(itertools.product(*(a.distribution.choices for a in groups)), GROUP_TREES):
            overrides = space.to_overrides(
                space.suggest(_StandIn(dict(zip((a.key for a in groups), combo))), self.axes)
            )
            group_choices, _, sampled = _parts(tuple(overrides))
            try:
                self._group_tree(group_choices, sampled)
            except ConfigError:
                pass  # an invalid combination: the trial that asks for it fails, with this error

    @functools.lru_cache(maxsize=256)
    def _composed(self, trial_overrides: tuple[str, ...]) -> dict:
        # Group choices go through Hydra (once per choice); sampled numbers are applied to that
        # tree, as Hydra applies them: a full compose per trial cost ~0.2 s of the driver.
        groups, values, sampled = _parts(trial_overrides)
        # The trials' sampled values are written into the group tree itself (a deep copy per trial
        # cost ~14 ms): every trial that uses it sets the same keys (``sampled``), so none sees
        # another's values; and read back into the tree resolved once, where that is the same.
        tree, template = self._group_tree(groups, sampled), self._template(groups, sampled)
        if template is None:
            config = with_values(tree, values, in_place=True)
        else:
            config = with_values_on(template, tree, values)
        validate(config_from_dict(config))
        return config

    @functools.lru_cache(maxsize=GROUP_TREES)
    def _template(self, groups: tuple[str, ...], sampled: frozenset[str]):
        return resolved_template(self._group_tree(groups, sampled), sampled)

    @functools.lru_cache(maxsize=GROUP_TREES)
    def _group_tree(self, groups: tuple[str, ...], sampled: frozenset[str]):
        """The composed tree for these group choices: this plan's own object (a copy or a fresh
        composition), which ``_composed`` writes the trials' values into.

        Each choice is composed alone and its group's subtree put into the base tree: the same
        tree as composing them together when no choice changes anything outside its own group
        (checked per choice; otherwise Hydra composes the combination).
        """
        parts = {o.split("=")[0]: self._choice_tree(o, sampled) for o in groups}
        if any(part is None for part in parts.values()):
            return compose_tree(self._base_overrides(sampled) + list(groups))
        return with_subtrees(self._base_tree(sampled), parts)

    @functools.lru_cache(maxsize=128)
    def _choice_tree(self, choice: str, sampled: frozenset[str]):
        """Hydra's tree with this one group choice; None if it differs from the base outside that group."""
        tree = compose_tree(self._base_overrides(sampled) + [choice])
        return tree if differs_only_at(self._base_tree(sampled), tree, choice.split("=")[0]) else None

    @functools.lru_cache(maxsize=16)
    def _base_tree(self, sampled: frozenset[str]):
        return compose_tree(self._base_overrides(sampled))

    def _base_overrides(self, sampled: frozenset[str]) -> list[str]:
        """The study's Hydra overrides, less those of keys the trial samples."""
        return [o for o in self.hydra_overrides if o.split("=")[0].lstrip("+~") not in sampled]

    def __hash__(self) -> int:  # lru_cache on a method needs a hashable self
        return id(self)


def _parts(trial_overrides: tuple[str, ...]) -> tuple[tuple[str, ...], list[str], frozenset[str]]:
    """A trial's overrides as (group choices, plain values, the keys it samples): the group tree's
    cache key (``precompose`` fills that cache with the same key) and what goes on top of it."""
    groups = tuple(o for o in trial_overrides if not is_value_override(o))
    values = [o for o in trial_overrides if is_value_override(o)]
    return groups, values, frozenset(o.split("=")[0] for o in trial_overrides)


class _StandIn:
    """A trial for ``space.suggest`` that answers with given group choices, else the lowest value."""

    def __init__(self, choices: dict[str, Any]) -> None:
        self.choices = choices

    def suggest_categorical(self, key: str, choices):
        return self.choices.get(key, choices[0])

    def suggest_int(self, key: str, low: int, high: int, **_) -> int:
        return low

    def suggest_float(self, key: str, low: float, high: float, **_) -> float:
        return low


def blind_trials(sampler) -> float:
    """How many of a study's first trials ``sampler`` draws without looking at any result: all of
    them (inf) for random, QMC and grid; TPE's start-up trials, drawn at random. Asking for these
    ahead of time gives the very trials one-by-one asking would, so they can train together."""
    if isinstance(sampler, (optuna.samplers.RandomSampler, optuna.samplers.QMCSampler, optuna.samplers.GridSampler)):
        return math.inf
    if isinstance(sampler, optuna.samplers.TPESampler):
        return TPE_STARTUP_TRIALS
    return 0


def split_overrides(args: list[str]) -> tuple[list[str], list[str]]:
    """``space.*`` / ``~space.*`` overrides (ours to parse) apart from everything else (Hydra's)."""
    ours = [a for a in args if a.lstrip("+~").startswith("space.")]
    return [a for a in args if a not in ours], ours


def plan_study(args: list[str]) -> StudyPlan:
    hydra_overrides, space_overrides = split_overrides(args)
    config = compose(hydra_overrides)
    cfg = config_from_dict(config)
    validate(cfg)
    study_space = space.apply_overrides(config.get("space") or {}, space_overrides)
    pinned = _pinned(hydra_overrides, study_space, space_overrides)
    config["space"] = space.apply_overrides(study_space, [f"~space.{_key(o)}" for o in pinned])
    options = {group: group_options(group) for group in space.GROUP_AXES}
    axes = space.parse_space(config["space"], config, options)
    _check_axis_values(axes, config)
    plan = StudyPlan(cfg, config, hydra_overrides, axes, _storage(cfg), 0, pinned=pinned)
    _check_objectives(cfg)
    plan.sampler = SAMPLERS.get(cfg.study.sampler)(plan)
    plan.pruner = PRUNERS.get(cfg.study.pruner)(cfg)
    plan.n_trials = _n_trials(cfg, axes)
    return plan


def _check_axis_values(axes: list[space.Axis], config: dict) -> None:
    """Every value a plain axis can give must fit the config's types and numeric bounds
    (``space.scale=interval(0, 1)``: scale must be > 0), checked now rather than as failed trials.

    Only the checks that hold whatever the groups: an option of one initializer (``initializer.mode``)
    may be valid for the initializers the space samples and not for the base one. Group axes'
    names were checked by ``parse_space``."""
    for axis in axes:
        if axis.key in space.GROUP_AXES:
            continue
        for value in space.extreme_values(axis):
            trial = copy.deepcopy(config)
            _set(trial, axis.key, value)
            try:
                check_numbers(config_from_dict(trial))
            except ConfigError as err:
                raise ConfigError(
                    f"space.{axis.key}={config['space'][axis.key]} can give {axis.key}={value}: {err}"
                ) from None


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree[key]
    tree[leaf] = value


def _pinned(hydra_overrides: list[str], study_space: dict, space_overrides: list[str]) -> list[str]:
    """Overrides that fix an axis the space would sample (``initializer=orthogonal`` under the
    default space): the value given wins and the axis is dropped, unless a ``space.<key>=...``
    override asks for it to be sampled."""
    asked = {_key(o)[len("space.") :] for o in space_overrides}
    return [
        o
        for o in hydra_overrides
        if "=" in o and not o.startswith("~") and _key(o) in study_space and _key(o) not in asked
    ]


def _key(override: str) -> str:
    return override.lstrip("+~").split("=")[0]


def _storage(cfg: Config) -> str:
    if cfg.study.storage:
        return cfg.study.storage
    return default_storage(cfg.study.output_dir, cfg.study.name)


def _check_objectives(cfg: Config) -> None:
    names = cfg.study.objectives
    if not names:
        raise ConfigError(f"study.objectives is empty; valid: {', '.join(objectives.DIRECTIONS)}")
    directions = [objectives.direction(n) for n in names]
    if cfg.study.pruner != "none" and (len(names) > 1 or directions[0] != "maximize"):
        raise ConfigError(
            f"study.pruner={cfg.study.pruner} prunes on val_accuracy and needs one maximized objective; got {names}"
        )
    if cfg.study.seeds < 1:
        raise ConfigError(f"study.seeds={cfg.study.seeds} is invalid; it must be >= 1")


def _n_trials(cfg: Config, axes: list[space.Axis]) -> int:
    if cfg.study.sampler == "grid":
        size = space.grid_size(axes)
        return size if cfg.study.n_trials is None else min(cfg.study.n_trials, size)
    if cfg.study.n_trials is None or cfg.study.n_trials < 1:
        raise ConfigError(
            f"study.n_trials={cfg.study.n_trials} is invalid; give a number >= 1 (null only with sampler=grid)"
        )
    return cfg.study.n_trials


class _AskTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler without its ``study.stop()`` (which only works inside ``optimize``).

    Our loop stops at the grid size itself (``n_trials`` defaults to it).
    """

    def after_trial(self, study, trial, state, values) -> None:
        return None


SAMPLERS.add(
    "tpe",
    lambda p: optuna.samplers.TPESampler(seed=p.cfg.study.seed, multivariate=True, n_startup_trials=TPE_STARTUP_TRIALS),
)
SAMPLERS.add("random", lambda p: optuna.samplers.RandomSampler(seed=p.cfg.study.seed))
SAMPLERS.add("qmc", lambda p: optuna.samplers.QMCSampler(seed=p.cfg.study.seed, warn_independent_sampling=False))
SAMPLERS.add("grid", lambda p: _AskTellGridSampler(space.grid(p.axes), seed=p.cfg.study.seed))
SAMPLERS.add("nsga2", lambda p: optuna.samplers.NSGAIISampler(seed=p.cfg.study.seed))

PRUNERS.add("none", lambda cfg: optuna.pruners.NopPruner())
PRUNERS.add("median", lambda cfg: optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1))
PRUNERS.add("successive_halving", lambda cfg: optuna.pruners.SuccessiveHalvingPruner(min_resource=1))
PRUNERS.add("hyperband", lambda cfg: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.train.epochs))
