"""Hydra's compositions kept on disk (pipeline/config/compose_cache.py): a cached tree is Hydra's tree, an
edited conf/ or schema is composed afresh, and a cache that cannot work is skipped."""

from __future__ import annotations

import shutil

import pytest
from omegaconf import OmegaConf

from pipeline.config import ConfigError, compose_cache
from pipeline.config import composition as compose

CASES = [
    [],
    ["initializer=orthogonal", "scale=2"],
    ["activation=maxout", "activation.pieces=3"],
    ["experiment=symmetry"],
]


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("INITSTUDY_COMPOSE_CACHE", raising=False)
    return tmp_path / "cache" / "initstudy" / "composed"


@pytest.fixture
def conf_copy(tmp_path, monkeypatch):
    """A private copy of conf/ that a test may edit."""
    copy = tmp_path / "conf"
    shutil.copytree(compose.CONF_DIR, copy)
    monkeypatch.setattr(compose, "CONF_DIR", copy)
    return copy


def _hydra_calls(monkeypatch) -> list:
    calls, hydra = [], compose._hydra_compose
    monkeypatch.setattr(compose, "_hydra_compose", lambda *a: calls.append(a) or hydra(*a))
    return calls


@pytest.mark.parametrize("overrides", CASES, ids=lambda o: " ".join(o) or "defaults")
def test_a_cached_composition_is_hydras_and_hydra_composes_once(cache_home, monkeypatch, overrides):
    calls = _hydra_calls(monkeypatch)
    first, second = compose.compose_tree(overrides), compose.compose_tree(overrides)
    assert len(calls) == 1 and len(list(cache_home.glob("*.pkl"))) == 1
    fresh = compose._hydra_compose(overrides, "config")
    assert OmegaConf.to_container(second) == OmegaConf.to_container(fresh) == OmegaConf.to_container(first)
    assert OmegaConf.is_struct(second) and OmegaConf.get_type(second) is OmegaConf.get_type(fresh)
    assert second is not first  # each caller owns its tree (the study writes trial values into it)
    with pytest.raises(ConfigError, match="could not be converted to Float"):  # still typed as the schema says
        compose.with_values(second, ["scale=abc"])


def test_an_edited_conf_file_is_composed_afresh(cache_home, conf_copy, monkeypatch):
    before = compose.compose(["initializer=orthogonal"])["initializer"]["gain"]
    path = conf_copy / "initializer" / "orthogonal.yaml"
    path.write_text(path.read_text().replace(f"gain: {before}", "gain: 0.25"))
    assert compose.compose(["initializer=orthogonal"])["initializer"]["gain"] == 0.25
    new = conf_copy / "activation" / "brand_new.yaml"
    new.write_text((conf_copy / "activation" / "tanh.yaml").read_text())
    assert compose.compose(["initializer=orthogonal"])["initializer"]["gain"] == 0.25  # any file counts: recomposed
    assert len(list(cache_home.glob("*.pkl"))) == 3


def test_an_edited_schema_changes_the_key(cache_home, tmp_path, monkeypatch):
    schemas = tmp_path / "config.py"
    schemas.write_text(compose_cache._SCHEMAS.read_text())
    monkeypatch.setattr(compose_cache, "_SCHEMAS", schemas)
    before = compose_cache.key(compose.CONF_DIR, "config", [])
    schemas.write_text(schemas.read_text() + "\n# a new field would go here\n")
    assert compose_cache.key(compose.CONF_DIR, "config", []) != before


def test_a_corrupt_cached_tree_is_composed_again(cache_home, monkeypatch):
    compose.compose_tree(["activation=tanh"])
    (cached,) = cache_home.glob("*.pkl")
    cached.write_bytes(cached.read_bytes()[:100])  # a crash mid-write (the rename makes that unlikely)
    calls = _hydra_calls(monkeypatch)
    assert compose.compose(["activation=tanh"])["activation"]["name"] == "tanh"
    assert len(calls) == 1 and compose_cache.load(cached.stem) is not None  # and it was replaced


def test_the_cache_off_or_unwritable_changes_nothing_but_speed(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-file"))
    (tmp_path / "a-file").write_text("not a directory")
    assert compose.compose(["activation=tanh"])["activation"]["name"] == "tanh"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("INITSTUDY_COMPOSE_CACHE", "off")
    calls = _hydra_calls(monkeypatch)
    compose.compose(["activation=tanh"]), compose.compose(["activation=tanh"])
    assert len(calls) == 2 and not (tmp_path / "cache").exists()


def test_bad_overrides_still_fail_with_hydras_message_and_are_not_cached(cache_home):
    for _ in range(2):
        with pytest.raises(ConfigError, match="nosuch"):
            compose.compose(["nosuch.key=1"])
    assert not list(cache_home.glob("*.pkl"))


def test_the_cache_keeps_at_most_max_files(cache_home, monkeypatch):
    monkeypatch.setattr(compose_cache, "MAX_FILES", 4)
    for scale in range(7):
        compose.compose_tree([f"scale={scale + 1}"])
    assert 2 <= len(list(cache_home.glob("*.pkl"))) <= 4


def test_a_hydra_search_path_is_never_cached(cache_home, conf_copy):
    """Its folders' files are outside the key: an edit there would go unseen."""
    assert compose_cache.key(conf_copy, "config", ["hydra.searchpath=[file:///elsewhere]"]) is None
    primary = conf_copy / "config.yaml"
    primary.write_text(primary.read_text() + "\n# hydra:\n#   searchpath: [file:///elsewhere]\n")
    assert compose_cache.key(conf_copy, "config", []) is None
    compose.compose_tree([])
    assert not list(cache_home.glob("*.pkl"))
