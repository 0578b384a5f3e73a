"""Every YAML file under conf/ composes, and conf/ and the registries agree both ways.

Datasets are composed and validated only, never loaded (mnist, fashion_mnist and cifar10 need files).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from pipeline.config import Config, ConfigError, config_from_dict, validate
from pipeline.config.composition import CONF_DIR, compose
from pipeline.engine import data
from pipeline.engine.nn.activations import ACTIVATIONS
from pipeline.engine.nn.initializers import INITIALIZERS
from pipeline.engine.nn.models import MODELS
from pipeline.engine.nn.norms import NORMALIZATIONS
from pipeline.engine.weights import save_weights
from pipeline.study.plan import plan_study

REGISTRIES = {
    "initializer": INITIALIZERS,
    "activation": ACTIVATIONS,
    "normalization": NORMALIZATIONS,
    "model": MODELS,
    "dataset": data.DATASETS,
}
GROUPS = ("initializer", "activation", "normalization", "model", "dataset", "optimizer", "tracking", "space")


def _files(*groups: str) -> list[tuple[str, str]]:
    return [(g, p.stem) for g in groups for p in sorted((CONF_DIR / g).glob("*.yaml"))]


def _ids(cases: list[tuple[str, str]]) -> list[str]:
    return [f"{g}/{n}" for g, n in cases]


GROUP_FILES = _files(*GROUPS[:-1])
SPACE_FILES = [f for f in _files("space") if f[1] != "empty"]  # empty: a base for experiments' own spaces


def test_every_group_has_files():
    for group in GROUPS:
        assert list((CONF_DIR / group).glob("*.yaml")), group
    assert len(GROUP_FILES) >= 40 and len(SPACE_FILES) >= 3  # the glob found the real conf/


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """Weights of the default model (so initializer=pretrained has a source that exists)."""
    from pipeline.config import ActivationConfig, ModelConfig, NormalizationConfig
    from pipeline.engine.nn.models import build_model

    path = tmp_path_factory.mktemp("weights") / "default.safetensors"
    save_weights(build_model(ModelConfig(), ActivationConfig(), NormalizationConfig(), (64,), 10), path)
    return path


@pytest.mark.parametrize("group, name", GROUP_FILES, ids=_ids(GROUP_FILES))
def test_every_group_file_composes_and_validates(group, name, weights_file):
    extra = [f"initializer.path={weights_file}"] if (group, name) == ("initializer", "pretrained") else []
    config = compose([f"{group}={name}", *extra])
    cfg = config_from_dict(config)
    validate(cfg)
    # A composed dict takes config_from_dict's direct path; OmegaConf must agree with it.
    assert cfg == OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), config))
    if group in REGISTRIES:
        registry = REGISTRIES[group]
        # An alias file (glorot_uniform.yaml) composes to its canonical name, so params use one name.
        assert config[group]["name"] == registry.canonical(name)
        assert config[group]["name"] in registry.names()
    elif group == "optimizer":
        assert config["optimizer"]["name"] == name
    elif group == "tracking":
        assert config["tracking"]["uri"] == yaml.safe_load((CONF_DIR / "tracking" / f"{name}.yaml").read_text())["uri"]


def test_pretrained_file_alone_names_its_missing_source():
    cfg = config_from_dict(compose(["initializer=pretrained"]))
    with pytest.raises(ConfigError, match="initializer.path or initializer.run_id"):
        validate(cfg)


@pytest.mark.parametrize("group", sorted(REGISTRIES))
def test_every_registry_entry_has_a_yaml_file(group):
    files = {p.stem for p in (CONF_DIR / group).glob("*.yaml")}
    names = set(REGISTRIES[group].names(aliases=True))
    assert names - files == set(), f"registered {group}s without conf/{group}/<name>.yaml"
    assert files - names == set(), f"conf/{group} files that name no registered {group}"


def _values(distribution) -> list:
    """The values of an axis worth composing: every choice, or both ends of a range."""
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    assert isinstance(distribution, (IntDistribution, FloatDistribution))
    return [distribution.low, distribution.high]


@pytest.mark.parametrize("group, name", SPACE_FILES, ids=_ids(SPACE_FILES))
def test_every_space_plans_and_each_of_its_values_composes(group, name, tmp_path):
    plan = plan_study([f"space={name}", f"study.output_dir={tmp_path}"])
    declared = yaml.safe_load((CONF_DIR / "space" / f"{name}.yaml").read_text())
    assert {axis.key for axis in plan.axes} == set(declared)
    assert plan.n_trials >= 1
    for axis in plan.axes:
        if axis.distribution is None:
            continue
        for value in _values(axis.distribution):
            config = plan.trial_config({axis.key: value}, seed=0)  # composes and validates
            node = config
            *parents, leaf = axis.key.split(".")
            for part in parents:
                node = node[part]
            got = node[leaf]["name"] if isinstance(node[leaf], dict) else node[leaf]
            assert got == value or (axis.key in REGISTRIES and got == REGISTRIES[axis.key].canonical(value))


@pytest.mark.parametrize(
    "key, value, message",
    [("scale", "big", "scale"), ("batch_size", 6.5, "batch_size"), ("model", {"depht": 4}, "depht")],
)
def test_a_config_dict_of_wrong_types_or_keys_is_refused_naming_the_key(key, value, message):
    config = compose([])
    config[key] = value
    with pytest.raises(ConfigError, match=message):
        config_from_dict(config)


def test_a_config_dict_of_convertible_values_is_converted_as_omegaconf_does():
    config = compose([])
    config.update(scale=2, seed="3")
    cfg = config_from_dict(config)
    assert (cfg.scale, type(cfg.scale), cfg.seed) == (2.0, float, 3)


def test_the_artifact_root_follows_the_store_unless_given(tmp_path):
    from pipeline.config.composition import compose

    assert compose([])["tracking"]["artifact_root"] == "runs/artifacts"  # the default store's, as always
    elsewhere = f"sqlite:///{tmp_path}/store/mlflow.db"
    assert compose([f"tracking.uri={elsewhere}"])["tracking"]["artifact_root"] == str(tmp_path / "store" / "artifacts")
    given = [f"tracking.uri={elsewhere}", f"tracking.artifact_root={tmp_path}/a"]
    assert compose(given)["tracking"]["artifact_root"] == f"{tmp_path}/a"
