"""The trial engine: learning happens, symmetry never breaks, divergence is a result, runs repeat."""

from __future__ import annotations

import ctypes.util
import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.config.catalog import INITIALIZERS, NORMALIZATIONS
from pipeline.config.composition import compose
from pipeline.engine.train import evaluate, prepare_trial, run_trial, train_trial


def test_kaiming_relu_learns_digits_in_a_few_epochs(make_config):
    result = run_trial(make_config("initializer=kaiming_normal", "activation=relu", "train.epochs=5", tiny=False))
    assert result.final_accuracy > 0.93
    assert not result.diverged
    assert result.epochs_to_target is not None and result.epochs_to_target <= 5


@pytest.mark.parametrize("init", ["zeros", "constant"])
def test_symmetric_init_never_breaks_symmetry(make_config, init):
    prepared = prepare_trial(make_config(f"initializer={init}", "activation=tanh", "train.epochs=3"))
    result = train_trial(prepared)
    for block in prepared.model.blocks:
        rows = block.layer.weight.detach()
        # Every hidden unit got the same update, so every row is still the first row.
        assert torch.allclose(rows, rows[0].expand_as(rows), atol=1e-6)
    assert result.final_accuracy < 0.3  # chance is 0.1 on 10 classes; one unit's worth of features


def test_small_random_init_breaks_symmetry(make_config):
    prepared = prepare_trial(make_config("initializer=normal", "initializer.std=0.1", "activation=tanh"))
    train_trial(prepared)
    rows = prepared.model.blocks[0].layer.weight.detach()
    assert rows.std(dim=0).mean() > 1e-3


def test_nan_loss_ends_the_trial_diverged_without_exception(make_config):
    result = run_trial(make_config("optimizer.lr=1e8", "scale=50", "train.epochs=4"))
    assert result.diverged and result.diverged_epoch == 1
    assert result.epochs_run == 1
    assert not math.isfinite(result.history[-1]["train_loss"])
    assert result.final_accuracy <= 0.2  # non-finite logits count as wrong


def test_same_config_gives_the_same_curves(make_config):
    config = make_config("activation=tanh", "normalization=batch", "seed=3")
    first, second = run_trial(config), run_trial(config)
    assert first.history == second.history
    assert first.layer_table == second.layer_table


def test_a_pretrained_starts_excluded_layers_replay_from_the_seed_whatever_ran_before(make_config, tmp_path):
    """The head a pretrained start leaves out keeps its built values: they come from the trial's
    seed, not from what the process drew before (a worker's earlier trials)."""
    from pipeline.engine.weights import save_weights

    save_weights(prepare_trial(make_config()).model, tmp_path / "w.safetensors")

    def head(seed: int) -> torch.Tensor:
        config = make_config(
            "initializer=pretrained",
            f"initializer.path={tmp_path / 'w.safetensors'}",
            "initializer.exclude=[head]",
            f"seed={seed}",
        )
        torch.rand(seed + 7)  # what an earlier trial in this process drew
        return prepare_trial(config).model.head.weight.detach().clone()

    assert torch.equal(head(0), head(0))
    assert not torch.equal(head(0), head(1))
    state = torch.get_rng_state()
    prepare_trial(make_config())
    assert torch.equal(torch.get_rng_state(), state)  # and the process's own generator is left as it was


def test_other_seed_gives_other_curves(make_config):
    first = run_trial(make_config("seed=1"))
    second = run_trial(make_config("seed=2"))
    assert first.history[-1]["train_loss"] != second.history[-1]["train_loss"]


def test_report_gets_every_epoch_and_can_stop_the_trial(make_config):
    steps = []

    def report(step, metrics):
        steps.append((step, set(metrics)))
        return step == 1  # prune after the first epoch

    result = run_trial(make_config("train.epochs=5"), report)
    assert [s for s, _ in steps] == [0, 1]
    assert {"val_accuracy", "init_act_std_ratio", "init_grad_norm_ratio", "dead_fraction"} <= steps[0][1]
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "update_ratio"} <= steps[1][1]
    assert result.pruned and result.epochs_run == 1


@pytest.mark.parametrize("overrides", [("normalization=batch",), ("optimizer.lr=1e8", "scale=50")])
def test_final_val_accuracy_is_the_model_as_it_ends(make_config, overrides):
    # Taken from the last epoch's measurement when that saw the final model, measured afresh after
    # a divergence (whose epoch has no validation): either way, the model's own accuracy.
    prepared = prepare_trial(make_config(*overrides, "train.epochs=2"))
    result = train_trial(prepared)
    assert result.final_val_accuracy == evaluate(prepared.model, prepared.splits.x_val, prepared.splits.y_val)[1]
    if not result.diverged:
        assert result.final_val_accuracy == result.history[-1]["val_accuracy"]


def test_tiny_init_vanishes_with_depth(make_config):
    tiny = run_trial(
        make_config("initializer=normal", "initializer.std=0.01", "activation=tanh", "model.depth=12", "train.epochs=1")
    )
    xavier = run_trial(make_config("initializer=xavier_normal", "activation=tanh", "model.depth=12", "train.epochs=1"))
    assert tiny.history[0]["init_act_std_ratio"] < 1e-6
    assert tiny.history[0]["init_grad_norm_ratio"] < 1e-6  # the backprop signal dies before layer 1
    assert 0.2 < xavier.history[0]["init_act_std_ratio"] < 5


def test_batch_size_larger_than_training_set_is_a_config_error(make_config):
    with pytest.raises(ConfigError, match="batch_size=100000 is larger than the training set"):
        prepare_trial(make_config("batch_size=100000"))


#: Small enough for 200 trials in seconds: 64 training samples, two steps, a thin model, one
#: thread (OpenMP's spinning threads cost more than such small ops gain).
_CONTRACT = [
    "dataset.max_train=64", "dataset.val_fraction=0.05", "dataset.test_fraction=0.05", "batch_size=32",
    "train.epochs=1", "train.probe_size=16", "train.threads=1",
    "model.channels=8", "model.width=16", "model.width_multiplier=0.5", "normalization.groups=4",
]  # fmt: skip
_CONTRACT_DEPTH = {"mlp": 2, "cnn": 2, "resnet": 8}


@pytest.fixture(scope="module")
def pretrained_files(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """A weights file per model and normalization, for initializer=pretrained."""
    from pipeline.engine.weights import save_weights

    folder, files = tmp_path_factory.mktemp("pretrained"), {}
    for model in _CONTRACT_DEPTH:
        for norm in NORMALIZATIONS.names():
            config = _with(json.loads(_contract_config("kaiming_normal")), model, norm)
            files[model, norm] = folder / f"{model}-{norm}.safetensors"
            save_weights(prepare_trial(config).model, files[model, norm])
    return files


@functools.cache
def _contract_config(init: str) -> str:
    """One Hydra composition per initializer (as JSON); the model and normalization are set on it."""
    return json.dumps(compose([f"initializer={init}", *_CONTRACT]))


def _with(config: dict, model: str, norm: str) -> dict:
    config["model"].update(name=model, depth=_CONTRACT_DEPTH[model])
    config["normalization"]["name"] = norm
    return config


@pytest.mark.parametrize("init", INITIALIZERS.names())
@pytest.mark.parametrize("model", sorted(_CONTRACT_DEPTH))
@pytest.mark.parametrize("norm", NORMALIZATIONS.names())
def test_every_initializer_trains_every_model_with_every_normalization(init, model, norm, pretrained_files):
    """The registries' contract: each initializer x {mlp, cnn, resnet} x normalization builds, is
    diagnosed at init and trains a step (a diverged loss is a result, flagged, not an error)."""
    config = _with(json.loads(_contract_config(init)), model, norm)
    if init == "pretrained":
        config["initializer"]["path"] = str(pretrained_files[model, norm])
    result = run_trial(config)
    assert result.epochs_run == 1
    assert math.isfinite(result.history[-1]["train_loss"]) or result.diverged
    blocks = _CONTRACT_DEPTH[model] if model != "resnet" else 1 + 3  # resnet-8: the stem and 3 blocks
    assert len([row for row in result.layer_table if row["epoch"] == 0]) == blocks


_FAULTS_SCRIPT = """
import resource, torch
from pipeline.config.composition import compose
from pipeline.engine.train import prepare_trial

prepare_trial(compose(["model.depth=2", "model.width=32"]))

def page_faults(steps):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):  # a step's layer outputs and gradients (1-8 MB with 32 stacked members), then freed
        step = [torch.ones(megabytes << 18) for megabytes in (1, 2, 4, 8, 6, 3, 8, 4)]
        del step
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

page_faults(2)  # the heap grows once
print(page_faults(20))
"""


@pytest.mark.skipif(ctypes.util.find_library("c") != "libc.so.6", reason="glibc's allocator only")
def test_a_trial_process_reuses_freed_tensor_memory_without_faulting_it_in_again():
    # A fresh process, as a worker is (and no other thread of a test session faulting meanwhile).
    done = subprocess.run(
        [sys.executable, "-c", _FAULTS_SCRIPT],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    faults = int(done.stdout.split()[-1])
    # glibc's defaults: ~90,000 (blocks trimmed or unmapped, then mapped and faulted in again every step);
    # kept: 0 usually, up to ~6,000 when the heap settles in a later step than the warm-up.
    assert faults < 20_000, faults


def test_a_plain_net_records_its_mean_field_prediction_beside_what_it_measures(make_config):
    plain = run_trial(make_config("activation=tanh", "normalization=none", "model.depth=8", "train.threads=1",
                                  tiny=False))  # fmt: skip
    init = plain.history[0]
    assert init["theory_grad_norm_ratio"] == pytest.approx(init["init_grad_norm_ratio"], rel=0.15)
    assert init["theory_act_std_ratio"] == pytest.approx(init["init_act_std_ratio"], rel=0.15)
    assert init["theory_chi1"] > 0 and init["theory_trainable_depth"] > 0 and init["isometry_sv2_mean"] > 0
    normalized = run_trial(make_config("normalization=batch", "train.threads=1"))
    assert not [key for key in normalized.history[0] if key.startswith(("theory_", "isometry_"))]  # not theirs
    quiet = run_trial(make_config("normalization=none", "train.diagnostics=false", "train.threads=1"))
    assert "theory_chi1" not in quiet.history[0]
