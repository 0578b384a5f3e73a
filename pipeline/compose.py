"""Hydra composition: the only place that calls Hydra's entry points.

``compose(overrides)`` turns ``conf/`` plus command-line overrides into a resolved plain dict;
every Hydra or OmegaConf error becomes a one-line ``ConfigError``.
"""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.config import register_schemas
from pipeline.errors import ConfigError

CONF_DIR = Path(os.environ.get("INITSTUDY_CONF", Path(__file__).resolve().parent.parent / "conf"))


def compose(overrides: list[str], config_name: str = "config") -> dict:
    """Compose ``conf/`` with Hydra overrides into a resolved plain dict (raises ``ConfigError``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    _check_group_choices(overrides)
    register_schemas()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name, overrides=overrides)
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:  # hydra/omegaconf errors: parse, unknown key, wrong type
        raise ConfigError(_one_line(err)) from err


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def _check_group_choices(overrides: list[str]) -> None:
    """``initializer=foo`` -> "unknown initializer 'foo'; valid: ..." rather than Hydra's paragraph."""
    for override in overrides:
        key, sep, value = override.partition("=")
        key = key.lstrip("+~")
        if sep and not key:  # Hydra would read "=3" as the root group and say "Got int"
            raise ConfigError(f"malformed override '{override}': no key before '='; expected key=value")
        if sep and "." not in key and (CONF_DIR / key).is_dir() and value not in group_options(key):
            raise ConfigError(f"unknown {key} '{value}'; valid: {', '.join(group_options(key))}")


def _one_line(err: Exception) -> str:
    text = " ".join(str(err).split())
    cause = err.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f" ({' '.join(str(cause).split())})"
    return text
