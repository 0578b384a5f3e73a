"""A store's URL may carry a password: nothing recorded or printed keeps it."""

from __future__ import annotations

import sys

from pipeline.config.stores import masked, masked_tree, without_password
from pipeline.record.provenance import command_line, trial_params
from tests.conftest import TINY

URL = "postgresql+psycopg2://initstudy:s3cret%40x@127.0.0.1:5433/optuna"


def test_every_url_password_in_a_text_is_masked_and_nothing_else_changes():
    text = f"python -m pipeline run study.storage={URL} tracking.uri=http://me:pw@mlflow:5000 scale=2"
    assert masked(text) == (
        "python -m pipeline run study.storage=postgresql+psycopg2://initstudy:***@127.0.0.1:5433/optuna "
        "tracking.uri=http://me:***@mlflow:5000 scale=2"
    )
    for plain in ("sqlite:///runs/mlflow.db", "http://127.0.0.1:5000", "runs/studies/x/optuna.journal"):
        assert masked(plain) == plain


def test_a_config_tree_is_masked_in_every_string():
    tree = {"study": {"storage": URL, "objectives": ["val_accuracy"]}, "scale": 2.0, "tags": [URL]}
    assert "s3cret" not in str(masked_tree(tree))
    assert masked_tree(tree)["scale"] == 2.0 and masked_tree(tree)["study"]["objectives"] == ["val_accuracy"]


def test_a_masked_url_reopens_without_its_password():
    assert without_password(masked(URL)) == "postgresql+psycopg2://initstudy@127.0.0.1:5433/optuna"


def test_recorded_params_and_command_never_carry_a_password(make_config, monkeypatch):
    config = make_config(*TINY, "tracking.uri=http://me:pw@127.0.0.1:5000")
    assert trial_params(config)["tracking.uri"] == "http://me:***@127.0.0.1:5000"
    monkeypatch.setattr(sys, "argv", ["pipeline", "run", f"study.storage={URL}"])
    assert "s3cret" not in command_line() and "initstudy:***@" in command_line()
