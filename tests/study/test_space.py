"""Study spaces: Hydra's sweep grammar -> Optuna distributions; bad spaces fail before Ray starts."""

from __future__ import annotations

import re

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import JournalStorage

from pipeline.config import ConfigError
from pipeline.config.composition import compose, group_options
from pipeline.study import space
from pipeline.study.plan import plan_study, split_overrides
from pipeline.study.storage import default_storage, masked, open_storage

OPTIONS = {group: group_options(group) for group in space.GROUP_AXES}


def parse(make_config, **exprs):
    return space.parse_space(exprs, make_config(), OPTIONS)


def test_expressions_map_onto_optuna_distributions(make_config):
    axes = parse(
        make_config,
        initializer="choice(xavier_normal, kaiming_normal)",
        scale="tag(log, interval(0.25, 4))",
        batch_size="choice(32, 64)",
        **{"model.depth": "range(2, 8, 2)"},
    )
    dists = {a.key: a.distribution for a in axes}
    assert dists["initializer"] == CategoricalDistribution(["xavier_normal", "kaiming_normal"])
    assert dists["scale"] == FloatDistribution(0.25, 4.0, log=True)
    assert dists["batch_size"] == CategoricalDistribution([32, 64])
    assert dists["model.depth"] == IntDistribution(2, 6, step=2)  # Python's range: stop excluded


def test_plain_value_is_fixed(make_config):
    axes = parse(make_config, scale="0.5", activation="choice(relu, tanh)")
    params = space.suggest(optuna.create_study().ask(), axes)
    assert params["scale"] == 0.5 and params["activation"] in ("relu", "tanh")


def test_leaky_slope_is_sampled_only_for_leaky_relu(make_config):
    axes = parse(make_config, activation="choice(relu, leaky_relu)", **{"activation.slope": "interval(0.01, 0.3)"})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = [space.suggest(study.ask(), axes) for _ in range(20)]
    assert all(("activation.slope" in p) == (p["activation"] == "leaky_relu") for p in seen)
    assert any("activation.slope" in p for p in seen)


@pytest.mark.parametrize(
    "key, expr, message",
    [
        ("nonsense", "choice(1, 2)", "unknown axis 'nonsense'"),
        ("initializer", "choice()", "not a valid sweep expression|is empty"),
        ("scale", "interval(2, 1)", "low > high"),
        ("scale", "tag(log, interval(0, 1))", "log scale needs low > 0"),
        ("initializer", "choice(xavier_normal, nope)", "unknown initializer 'nope'; valid: .*kaiming_normal"),
        ("scale", "choice(1, 1)", "repeats a value"),
        ("model.depth", "range(5, 2)", "is empty"),
    ],
)
def test_bad_spaces_are_clear_errors(make_config, key, expr, message):
    with pytest.raises(ConfigError, match=message):
        parse(make_config, **{key: expr})


def test_command_line_space_overrides_change_and_drop_axes():
    base = {"initializer": "choice(a, b)", "scale": "interval(1, 2)"}
    changed = space.apply_overrides(
        base, ["space.scale=tag(log, interval(0.1, 10))", "~space.initializer", "space.model.depth=range(2, 4)"]
    )
    assert changed == {"scale": "tag(log, interval(0.1, 10))", "model.depth": "range(2, 4)"}
    with pytest.raises(ConfigError, match="no such axis"):
        space.apply_overrides(base, ["~space.batch_size"])


def test_split_keeps_space_overrides_away_from_hydra():
    hydra, ours = split_overrides(["study.n_trials=3", "space.scale=interval(1,2)", "~space.activation", "space=depth"])
    assert hydra == ["study.n_trials=3", "space=depth"]
    assert ours == ["space.scale=interval(1,2)", "~space.activation"]


def test_an_axis_fixed_on_the_command_line_is_not_sampled_unless_the_space_is_named(tmp_path):
    out = f"study.output_dir={tmp_path}"
    plan = plan_study(["initializer=orthogonal", "batch_size=32", "optimizer.lr=0.1", out])
    assert plan.pinned == ["initializer=orthogonal", "batch_size=32"]  # optimizer.lr is no axis of the default space
    assert [a.key for a in plan.axes] == ["scale", "activation", "normalization"]
    config = plan.trial_config({"scale": 2.0, "activation": "tanh", "normalization": "batch"}, seed=0)
    assert (config["initializer"]["name"], config["batch_size"], config["scale"]) == ("orthogonal", 32, 2.0)
    # Asked for by name, the axis is sampled (the space's values win over the base value).
    plan = plan_study(["initializer=orthogonal", "space.initializer=choice(xavier_normal, orthogonal)", out])
    assert plan.pinned == [] and "initializer" in [a.key for a in plan.axes]


@pytest.mark.parametrize(
    "override, named",
    [
        ("space.scale=interval(0, 1)", "scale=0.0"),  # an interval's end
        ("space.optimizer.lr=choice(0.1, 0)", "optimizer.lr=0"),  # any choice
        ("space.model.depth=range(0, 3)", "model.depth=0"),  # a range's start
    ],
)
def test_a_space_that_can_give_an_invalid_value_is_refused_before_any_trial(tmp_path, override, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        plan_study([override, f"study.output_dir={tmp_path}"])


def test_an_option_valid_for_the_sampled_initializers_but_not_the_base_one_is_kept(tmp_path):
    # fan_avg is a variance_scaling mode, not a mode of the base kaiming_normal: the space is fine.
    plan = plan_study(
        [
            "space=empty",
            "space.initializer=choice(variance_scaling)",
            "space.initializer.mode=choice(fan_in, fan_avg)",
            f"study.output_dir={tmp_path}",
        ]
    )
    assert [a.key for a in plan.axes] == ["initializer", "initializer.mode"]


def test_plan_grid_defaults_n_trials_to_the_grid_size(tmp_path):
    plan = plan_study(["space=axes_grid", "study.sampler=grid", "study.n_trials=null", f"study.output_dir={tmp_path}"])
    assert plan.n_trials == 6


def test_plan_rejects_interval_axes_for_the_grid(tmp_path):
    with pytest.raises(ConfigError, match="grid needs choice"):
        plan_study(["study.sampler=grid", f"study.output_dir={tmp_path}"])


def test_plan_rejects_unknown_sampler_and_objective(tmp_path):
    with pytest.raises(ConfigError, match="unknown sampler 'foo'; valid: grid, nsga2, qmc, random, tpe"):
        plan_study(["study.sampler=foo", f"study.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="unknown objective 'loss'"):
        plan_study(["study.objectives=[loss]", f"study.output_dir={tmp_path}"])


def test_trial_config_applies_params_as_overrides(tmp_path):
    plan = plan_study(["model.depth=3", f"study.output_dir={tmp_path}"])
    config = plan.trial_config({"initializer": "orthogonal", "scale": 0.5, "model.depth": 5}, seed=7)
    assert config["initializer"]["name"] == "orthogonal" and config["initializer"]["gain"] == 1.0
    assert (config["scale"], config["model"]["depth"], config["seed"]) == (0.5, 5, 7)


def test_trials_through_one_group_tree_each_get_exactly_what_compose_gives(tmp_path):
    """Trials of the same group choices share one tree their sampled values are written into:
    a value must never leak from one trial into the next, nor into the cached tree."""
    plan = plan_study(
        ["space.model.width=choice(16, 32)", "space.optimizer.lr=interval(0.01, 0.1)", f"study.output_dir={tmp_path}"]
    )
    plan.precompose()
    for scale, width, lr in [(0.5, 16, 0.01), (2, 32, 0.1), (0.75, 16, 0.05), (0.5, 16, 0.01)]:
        params = {
            "initializer": "orthogonal",
            "scale": scale,
            "activation": "tanh",
            "normalization": "batch",
            "batch_size": 32,
            "model.width": width,
            "optimizer.lr": lr,
        }
        expected = compose([*plan.hydra_overrides, *space.to_overrides(params)])
        expected["tracking"]["layer_plot"] = expected["study"]["trial_plots"]
        config = plan.trial_config(params, seed=0)
        assert config == expected and type(config["scale"]) is float


def test_precompose_composes_every_group_combination_so_trials_call_hydra_no_more(tmp_path):
    plan = plan_study(
        [
            "space.initializer=choice(orthogonal, kaiming_normal)",
            "space.activation=choice(relu, tanh)",
            "space.normalization=choice(batch, none)",
            f"study.output_dir={tmp_path}",
        ]
    )
    plan.precompose()
    composed = type(plan)._choice_tree.cache_info().misses
    for init in ("orthogonal", "kaiming_normal"):
        for act in ("relu", "tanh"):
            params = {"initializer": init, "scale": 1.5, "activation": act, "normalization": "none", "batch_size": 32}
            assert plan.trial_config(params, seed=0)["activation"]["name"] == act
    assert type(plan)._choice_tree.cache_info().misses == composed


def test_a_study_stores_its_trials_in_a_journal_file_but_keeps_an_earlier_sqlite_one(tmp_path):
    plan = plan_study(["study.name=fresh", f"study.output_dir={tmp_path}"])
    assert plan.storage == str((tmp_path / "fresh" / "optuna.journal").resolve())
    assert isinstance(open_storage(plan.storage), JournalStorage)
    (tmp_path / "old").mkdir()
    optuna.create_study(storage=f"sqlite:///{tmp_path}/old/optuna.db", study_name="old")  # a study from before
    assert default_storage(str(tmp_path), "old") == f"sqlite:///{(tmp_path / 'old' / 'optuna.db').resolve()}"
    assert open_storage(f"sqlite:///{tmp_path}/x.db") == f"sqlite:///{tmp_path}/x.db"  # a sqlite URL as it is
    assert masked("postgresql://u:pw@db:5432/optuna") == "postgresql://u:***@db:5432/optuna"  # servers: RDBStorage
