"""Private APIs of Ray, MLflow and Optuna that we use for speed: each is named in one place in the
code, and this test fails loudly when an upgrade removes one (the code then falls back, slowly, or
breaks: either way the upgrade needs a look)."""

from __future__ import annotations

import importlib

import optuna
import pytest

from pipeline.record.store import PRIVATE_MLFLOW_APIS
from pipeline.study.cluster import PRIVATE_RAY_APIS


@pytest.mark.parametrize("module, attribute", [*PRIVATE_MLFLOW_APIS, *PRIVATE_RAY_APIS], ids=lambda x: str(x))
def test_each_private_api_we_use_still_exists(module, attribute):
    assert hasattr(importlib.import_module(module), attribute), f"{module}.{attribute} is gone: see where it is used"


def test_an_asked_trials_storage_id_is_still_trial_id(tmp_path):
    # The driver hands a trial's storage id to the pruning oracle and re-opens interrupted trials by it.
    study = optuna.create_study()
    trial = study.ask()
    assert isinstance(trial._trial_id, int)
    assert optuna.trial.Trial(study, trial._trial_id).number == trial.number
