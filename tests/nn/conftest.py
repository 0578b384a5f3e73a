"""Fixtures shared by the nn tests: compose one group option through Hydra, as the CLI does."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from pipeline.config import register_schemas

CONF = Path(__file__).resolve().parents[2] / "conf"

# Selects only the groups the nn tests own, so other groups' files need not exist.
PRIMARY = f"""\
defaults:
  - base_config
  - initializer: kaiming_normal
  - activation: relu
  - normalization: none
  - _self_
hydra:
  searchpath:
    - file://{CONF}
"""


def group_options(group: str) -> list[str]:
    """The option names (YAML file stems) of one group in conf/."""
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


@pytest.fixture
def compose_group(tmp_path: Path) -> Callable[[str, str], DictConfig]:
    """``compose_group("initializer", "glorot_uniform")`` -> the composed ``initializer`` node."""
    register_schemas()
    (tmp_path / "primary.yaml").write_text(PRIMARY)

    def run(group: str, option: str) -> DictConfig:
        with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
            return compose("primary", overrides=[f"{group}={option}"])[group]

    return run


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread per test module.

    On a 2-CPU box MKL's QR (orthogonal_) right after an OpenMP-parallel op stalls ~0.3 s behind
    OpenMP's spinning threads (1 ms with one thread): the suite runs in half the time.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
