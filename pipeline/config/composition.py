"""Hydra composition: the only place that calls Hydra's entry points.

``compose(overrides)`` turns ``conf/`` plus command-line overrides into a resolved plain dict;
every Hydra or OmegaConf error becomes a one-line ``ConfigError``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import os
import re
import typing
from pathlib import Path
from typing import Any

from pipeline.config import compose_cache
from pipeline.config.errors import ConfigError, one_line
from pipeline.config.schema import Config, register_schemas
from pipeline.config.stores import artifacts_beside

CONF_DIR = Path(os.environ.get("INITSTUDY_CONF", Path(__file__).resolve().parents[2] / "conf"))
# Hydra's own config groups (logging, launcher, sweeper, help...) serve @hydra.main apps; the
# compose API loads them all the same and drops them from its result. Skipped: 157 -> 119 ms a
# composition (a study composes a dozen while Ray starts).
_HYDRA_OWN_GROUPS = [
    f"~hydra/{group}"
    for group in ("job_logging", "hydra_logging", "help", "hydra_help", "launcher", "sweeper", "output", "env")
]


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    # conf/tracking/local.yaml: artifact_root: ${artifacts_beside:${tracking.uri}}
    OmegaConf.register_new_resolver("artifacts_beside", artifacts_beside, replace=True)


_register_resolvers()

#: The user's own config folders (``--config-dir``), searched after conf/: their config groups,
#: experiments and spaces compose, and are checked, like the built-in ones.
USER_CONF_DIRS: list[Path] = []


def add_config_dir(path: str) -> None:
    """Search ``path`` for configs too (Hydra's search path), after conf/."""
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise ConfigError(f"--config-dir {path}: no such folder")
    if folder not in USER_CONF_DIRS:
        USER_CONF_DIRS.append(folder)


def _conf_dirs() -> list[Path]:
    return [CONF_DIR, *USER_CONF_DIRS]


def _search_path() -> list[str]:
    """The override that hands the user's folders to Hydra (a composition naming it is never cached)."""
    if not USER_CONF_DIRS:
        return []
    return [f"hydra.searchpath=[{','.join(folder.as_uri() for folder in USER_CONF_DIRS)}]"]


def compose(overrides: list[str], config_name: str = "config") -> dict:
    """Compose ``conf/`` with Hydra overrides into a resolved plain dict (raises ``ConfigError``)."""
    return _resolved(compose_tree(overrides, config_name))


def compose_tree(overrides: list[str], config_name: str = "config") -> Any:
    """The composed, unresolved ``DictConfig`` (struct mode, as Hydra leaves it); see ``with_values``.

    A composition Hydra made before from the same ``conf/``, schemas and versions comes from the
    cache (pipeline/config/compose_cache.py): ~2 ms instead of ~0.1-0.2 s. Each call returns a new tree.
    """
    _check_group_choices(overrides)
    overrides = [*_search_path(), *overrides]
    key = compose_cache.key(CONF_DIR, config_name, [*_HYDRA_OWN_GROUPS, *overrides])
    tree = compose_cache.load(key)
    if tree is None:
        tree = _hydra_compose(overrides, config_name)
        compose_cache.store(key, tree)
    return tree


def _hydra_compose(overrides: list[str], config_name: str) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    _register_schemas_once()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name, overrides=[*_HYDRA_OWN_GROUPS, *overrides])
    except Exception as err:  # hydra/omegaconf errors: parse, unknown key, wrong type
        unknown = UNKNOWN_KEY.match(str(err))
        raise ConfigError(_unknown_key(unknown.group(1)) if unknown else one_line(err, with_cause=True)) from err


# Hydra's message for a key no schema has suggests "+key=...", which a schema then refuses too.
UNKNOWN_KEY = re.compile(r"Could not override '([^']+)'")


def _unknown_key(key: str) -> str:
    """``model.dpeth`` -> "unknown key 'model.dpeth' (did you mean model.depth?); model's keys: ..."."""
    *parents, leaf = key.split(".")
    schema = Config
    for part in parents:
        hints = typing.get_type_hints(schema)
        if part not in hints or not dataclasses.is_dataclass(hints[part]):
            return f"unknown key '{key}'"
        schema = hints[part]
    valid = [f.name for f in dataclasses.fields(schema)]
    close = difflib.get_close_matches(leaf, valid, n=1)
    guess = f" (did you mean {'.'.join([*parents, close[0]])}?)" if close else ""
    where = f"{'.'.join(parents)}'s keys" if parents else "top-level keys"
    return f"unknown key '{key}'{guess}; {where}: {', '.join(valid)}"


def is_value_override(override: str) -> bool:
    """``key=value`` of a plain key (not a config group, no ``+``/``~`` prefix): ``with_values`` can apply it."""
    key, sep, _ = override.partition("=")
    return bool(sep) and key[:1] not in "+~" and not _is_group(key)


def _is_group(key: str) -> bool:
    return any((folder / key).is_dir() for folder in _conf_dirs())


def with_values(tree: Any, overrides: list[str], in_place: bool = False) -> dict:
    """``tree`` (from ``compose_tree``) with plain ``key=value`` overrides, resolved to a plain dict.

    Equal to composing with those overrides added: Hydra too applies non-group overrides to the
    composed struct config, after the defaults list (``OmegaConf.update(cfg, key, value,
    merge=True)``), with values parsed by its override grammar. It skips Hydra's defaults-list
    and YAML loading, which cost ~0.15 s per call: a study composes each group choice once and
    applies the sampled numbers here.

    ``in_place``: write into ``tree`` itself rather than a copy (copying costs ~13 ms, two thirds
    of the call), for a caller whose every call on this tree sets the same keys, so that no value
    of an earlier call survives. Scalars only: a dict or list value merges into what is there, so
    those still go to a copy.
    """
    from omegaconf import OmegaConf

    try:
        parsed = _parsed(overrides)
        scalars = all(not isinstance(value, (dict, list)) for _, value in parsed)
        cfg = tree if in_place and scalars else copy.deepcopy(tree)
        for key, value in parsed:
            OmegaConf.update(cfg, key, value, merge=True)
    except Exception as err:
        raise ConfigError(one_line(err, with_cause=True)) from err
    return _resolved(cfg)


def resolved_template(tree: Any, keys: frozenset[str]) -> Any:
    """``tree`` resolved once, for trials that set only ``keys`` on it (``with_values_on``); None
    where an interpolation may read one of them, so that each trial must resolve its own tree.

    Resolving the whole tree is two thirds of ``with_values`` (~2 ms a study trial): a tree
    whose interpolations read none of the sampled keys resolves to the same values every time.
    """
    from omegaconf import OmegaConf

    heads = {key.split(".")[0] for key in keys}  # conservative: any mention of a sampled key's top level
    texts = [text for text in _strings(OmegaConf.to_container(tree, resolve=False)) if "${" in text]
    if any(head in text for text in texts for head in heads):
        return None
    return _resolved(tree)


def with_values_on(template: dict, tree: Any, overrides: list[str]) -> dict:
    """``with_values(tree, overrides, in_place=True)`` for a tree whose ``resolved_template`` is
    ``template``: each value goes through ``tree`` (Hydra's grammar, the schema's conversion and
    checks) and is read back into a copy of the template; nothing else is resolved again."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    config = plain_copy(template)
    try:
        for key, value in _parsed(overrides):
            OmegaConf.update(tree, key, value, merge=True)
            typed = OmegaConf.select(tree, key)
            if isinstance(typed, (DictConfig, ListConfig)):  # a container value: resolve it all
                return with_values(tree, overrides, in_place=True)
            _set_path(config, key, typed)
    except Exception as err:
        raise ConfigError(one_line(err, with_cause=True)) from err
    return config


_NUMBER = re.compile(r"-?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_INTEGER = re.compile(r"-?\d+")
_PLAIN_KEY = re.compile(r"[A-Za-z_][\w.]*")


def _parsed(overrides: list[str]) -> list[tuple[str, Any]]:
    """``(key, value)`` of plain overrides as Hydra's grammar reads them; plain numbers are read
    here (Hydra's parser costs ~0.3 ms an override, a share of every study trial)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    numbers, rest = [], []
    for override in overrides:
        key, _, text = override.partition("=")
        if _PLAIN_KEY.fullmatch(key) and _NUMBER.fullmatch(text):
            numbers.append((key, int(text) if _INTEGER.fullmatch(text) else float(text)))
        else:
            rest.append(override)
    if not rest:  # the parser's creation alone costs ~0.8 ms
        return numbers
    return numbers + [(o.key_or_group, o.value()) for o in OverridesParser.create().parse_overrides(rest)]


def plain_copy(tree: Any) -> Any:
    """A deep copy of a resolved config (dicts, lists and scalars): ``copy.deepcopy``'s work,
    without its memo and dispatch (a third of its time)."""
    if isinstance(tree, dict):
        return {key: plain_copy(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [plain_copy(value) for value in tree]
    return tree


def _strings(tree: Any) -> list[str]:
    if isinstance(tree, dict):
        return [text for value in tree.values() for text in _strings(value)]
    if isinstance(tree, list):
        return [text for value in tree for text in _strings(value)]
    return [tree] if isinstance(tree, str) else []


def _set_path(config: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        config = config.setdefault(part, {})
    config[leaf] = value


def differs_only_at(tree: Any, other: Any, key: str) -> bool:
    """Whether two composed trees hold the same (unresolved) values everywhere outside ``key``."""
    from omegaconf import OmegaConf

    mine, theirs = (OmegaConf.to_container(t, resolve=False) for t in (tree, other))
    mine.pop(key, None)
    theirs.pop(key, None)
    return mine == theirs


def with_subtrees(tree: Any, parts: dict[str, Any]) -> Any:
    """A copy of ``tree`` whose subtree at each ``key`` is the one ``parts[key]`` holds there."""
    cfg = copy.deepcopy(tree)
    for key, part in parts.items():
        cfg[key] = copy.deepcopy(part[key])
    return cfg


def _resolved(cfg: Any) -> dict:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:  # a bad interpolation
        raise ConfigError(one_line(err, with_cause=True)) from err


@functools.lru_cache(maxsize=1)
def _register_schemas_once() -> None:
    # Storing converts every dataclass to a DictConfig (~60 ms); the ConfigStore keeps them.
    register_schemas()


def group_options(group: str) -> list[str]:
    """The choices of a config group: its YAML files in conf/ and in the user's config folders."""
    found = {p.stem for folder in _conf_dirs() for p in (folder / group).glob("*.yaml")}
    return sorted(stem for stem in found if not stem.startswith("_"))


def _check_group_choices(overrides: list[str]) -> None:
    """``initializer=foo`` -> "unknown initializer 'foo'; valid: ..." rather than Hydra's paragraph."""
    for override in overrides:
        key, sep, value = override.partition("=")
        key = key.lstrip("+~")
        if sep and not key:  # Hydra would read "=3" as the root group and say "Got int"
            raise ConfigError(f"malformed override '{override}': no key before '='; expected key=value")
        if sep and "." not in key and _is_group(key) and value not in group_options(key):
            raise ConfigError(f"unknown {key} '{value}'; valid: {', '.join(group_options(key))}")
