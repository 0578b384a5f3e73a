"""The diagnostics probe against a hand computation, and when it runs (``train.probe_schedule``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError, TrainConfig, config_from_dict, validate
from pipeline.config.composition import compose
from pipeline.engine import diagnostics
from pipeline.engine.nn.activations import ACTIVATIONS
from pipeline.engine.train import prepare_trial, probe_due, run_trial


def _by_hand(model, x, y, saturated):
    """Every hidden layer's numbers from a plain forward with retained gradients."""
    h, rows = x.flatten(1), []
    pre_acts, acts = [], []
    for block in model.blocks:
        pre = block.layer(h)
        pre.retain_grad()
        normed = block.norm(pre)
        h = block.act(normed)
        pre_acts.append(pre)
        acts.append((normed, h))
    loss = F.cross_entropy(model.head(h), y)
    loss.backward()
    for block, pre, (normed, out) in zip(model.blocks, pre_acts, acts):
        row = {
            "act_std": float(out.detach().std()),
            "grad_norm": float(pre.grad.norm()),
            "weight_grad_norm": float(block.layer.weight.grad.norm()),
            "dead_fraction": float((normed.detach() <= 0).all(dim=0).float().mean()),
        }
        if saturated is not None:
            row["saturated_fraction"] = float(saturated(out.detach()).float().mean())
        rows.append(row)
    model.zero_grad(set_to_none=True)
    return rows


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
def test_probe_gives_the_hand_computed_numbers_for_every_layer(activation):
    prep = prepare_trial(
        compose([f"activation={activation}", "model.depth=3", "model.width=24", "train.probe_size=64"])
    )
    x, y = prep.splits.x_train[:64], prep.splits.y_train[:64]
    saturated = ACTIVATIONS.get(activation).saturated
    expected = _by_hand(prep.model, x, y, saturated)
    got = diagnostics.probe(prep.model, x, y, saturated=saturated)
    assert len(got.layers) == 3
    for row, want in zip(got.layers, expected):
        assert set(row) == {"layer", *want}
        for key, value in want.items():
            assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert all(p.grad is None for p in prep.model.parameters())  # the probe leaves no trace


@pytest.mark.parametrize("members", [1, 3])  # one trial's layer; a stack of trials (the two-pass path)
def test_activation_std_is_exact_for_a_tiny_spread_around_a_large_mean(members):
    # Saturated sigmoids sit near 1 with a spread of 1e-4: a one-pass E[x^2]-E[x]^2 loses it.
    t = 1.0 + 1e-4 * torch.randn(1, members, 4096, generator=torch.Generator().manual_seed(0))
    got = diagnostics._std(t)
    assert got.shape == (1, members)
    assert torch.allclose(got.double(), t.double().std(dim=-1), rtol=1e-3)


def test_log_schedule_probes_epochs_0_1_2_4_8_and_the_last():
    train = TrainConfig(epochs=10)
    assert [e for e in range(11) if probe_due(train, e)] == [0, 1, 2, 4, 8, 10]
    every = TrainConfig(epochs=10, probe_schedule="every")
    assert [e for e in range(11) if probe_due(every, e)] == list(range(11))
    assert not any(probe_due(TrainConfig(epochs=10, diagnostics=False), e) for e in range(11))


@pytest.mark.parametrize("schedule, probed", [("log", [0, 1, 2, 4, 5]), ("every", [0, 1, 2, 3, 4, 5])])
def test_a_trial_records_diagnostics_at_the_scheduled_epochs_and_curves_at_every_epoch(schedule, probed):
    result = run_trial(
        compose(["model.depth=2", "model.width=16", "train.epochs=5", f"train.probe_schedule={schedule}"])
    )
    assert [row["epoch"] for row in result.history] == list(range(6))
    assert [row["epoch"] for row in result.history if "act_std_ratio" in row] == probed
    assert sorted({row["epoch"] for row in result.layer_table}) == probed
    assert all("val_accuracy" in row for row in result.history)


def test_an_unknown_probe_schedule_is_refused_naming_the_valid_ones():
    config = config_from_dict(compose(["train.probe_schedule=sometimes"]))
    with pytest.raises(ConfigError, match="train.probe_schedule='sometimes' is invalid; valid: log, every"):
        validate(config)
