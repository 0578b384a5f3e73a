"""Trial batching: members trained together must get the curves they get alone."""

from __future__ import annotations

import math

import pytest

from pipeline.config.composition import compose
from pipeline.engine.batched import train_batch
from pipeline.engine.train import prepare_trial, train_trial
from pipeline.study.grouping import batch_key, task_cost
from pipeline.study.loop import _task_groups

SMALL = ["model.depth=3", "model.width=32", "train.epochs=3", "train.probe_size=64", "train.threads=1"]
# Members differ in what each keeps for itself: initializer, scale, seed.
MEMBERS = [("xavier_normal", 1.0, 0), ("kaiming_uniform", 2.0, 1), ("orthogonal", 0.5, 2), ("normal", 1.0, 3)]
SHAPES = {
    "relu-none-sgd": [],
    "tanh-batch-sgd": ["activation=tanh", "normalization=batch"],
    "maxout-layer-adam": ["activation=maxout", "normalization=layer", "optimizer=adam", "optimizer.lr=0.003"],
    "gelu-group-residual": ["activation=gelu", "normalization=group", "normalization.groups=4", "model.residual=true"],
}


def _configs(shape: list[str], members=MEMBERS) -> list[dict]:
    return [compose([*SMALL, *shape, f"initializer={i}", f"scale={s}", f"seed={seed}"]) for i, s, seed in members]


# float32 matmuls batched round in another order than alone; three epochs of training grow that to
# ~1e-4 relative in gradient norms on some CPUs. A wrong member or a mixed-up order is off by far more.
REL_TOLERANCE = 1e-3


def _assert_same_rows(alone: list[dict], together: list[dict]) -> None:
    assert len(alone) == len(together)
    for solo_row, batch_row in zip(alone, together):
        assert solo_row.keys() == batch_row.keys()
        for key, value in solo_row.items():
            other = batch_row[key]
            assert (math.isnan(value) and math.isnan(other)) or other == pytest.approx(
                value, rel=REL_TOLERANCE, abs=1e-5
            ), key


def _assert_same_curves(alone, together) -> None:
    _assert_same_rows(alone.history, together.history)  # every epoch's metrics, diagnostics included
    _assert_same_rows(alone.layer_table, together.layer_table)  # every layer's diagnostics, every epoch
    assert (alone.final_accuracy, alone.diverged, alone.pruned, alone.epochs_run) == (
        together.final_accuracy,
        together.diverged,
        together.pruned,
        together.epochs_run,
    )


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_batched_members_train_exactly_as_alone(shape):
    configs = _configs(shape)
    alone = [train_trial(prepare_trial(c)) for c in configs]
    together = train_batch([prepare_trial(c) for c in configs])
    for a, b in zip(alone, together):
        _assert_same_curves(a, b)
    assert len({round(r.final_accuracy, 6) for r in together}) > 1  # the members did differ


def test_a_diverging_member_stops_alone_and_the_others_train_on():
    configs = _configs(["optimizer.lr=0.1"], [("kaiming_normal", 8.0, 0), ("xavier_normal", 1.0, 1)])
    diverging, healthy = train_batch([prepare_trial(c) for c in configs])
    assert diverging.diverged and diverging.epochs_run < 3
    assert not healthy.diverged and healthy.epochs_run == 3 and healthy.final_accuracy > 0.5
    _assert_same_curves(train_trial(prepare_trial(configs[1])), healthy)


def test_a_pruned_member_stops_where_its_report_said():
    configs = _configs([])[:3]
    stop_second_at_epoch_1 = [None, lambda step, metrics: step == 1, None]
    results = train_batch([prepare_trial(c) for c in configs], stop_second_at_epoch_1)
    assert [r.pruned for r in results] == [False, True, False]
    assert [r.epochs_run for r in results] == [3, 1, 3]
    _assert_same_curves(train_trial(prepare_trial(configs[1]), lambda step, metrics: step == 1), results[1])


# Interleaved on purpose: the batch orders members by activation and must give results back in order.
MIXED = [
    ("xavier_normal", 1.0, 0, "tanh"),
    ("kaiming_uniform", 2.0, 1, "relu"),
    ("orthogonal", 0.5, 2, "sigmoid"),
    ("normal", 1.0, 3, "tanh"),
    ("lecun_normal", 1.0, 4, "leaky_relu"),
    ("kaiming_normal", 1.0, 5, "relu"),
]


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_members_with_different_activations_train_exactly_as_alone(norm):
    configs = [
        compose(
            [*SMALL, f"normalization={norm}", f"initializer={i}", f"scale={s}", f"seed={seed}", f"activation={act}"]
        )
        for i, s, seed, act in MIXED
    ]
    assert len({batch_key(c) for c in configs}) == 1
    alone = [train_trial(prepare_trial(c)) for c in configs]
    together = train_batch([prepare_trial(c) for c in configs])
    for a, b in zip(alone, together):
        _assert_same_curves(a, b)  # rows compared key by key: saturated_fraction only for tanh/sigmoid
    assert "saturated_fraction" in together[2].layer_table[0] and "saturated_fraction" not in together[1].layer_table[0]


def test_batch_key_groups_trials_that_differ_only_in_init_scale_seed_and_activation():
    a, b = _configs([], MEMBERS[:2])
    assert batch_key(a) is not None and batch_key(a) == batch_key(b)
    for own in (
        ["activation=tanh"],
        ["activation=leaky_relu", "activation.slope=0.2"],
        ["activation=maxout", "activation.pieces=1"],
    ):
        assert batch_key(compose([*SMALL, *own])) == batch_key(a), own  # maxout of 1 piece keeps the width
    for shared in (["batch_size=32"], ["activation=maxout"], ["optimizer.lr=0.01"], ["model.width=64"]):
        assert batch_key(compose([*SMALL, *shared])) != batch_key(a), shared
    assert batch_key(compose([*SMALL, "activation=maxout"])) != batch_key(
        compose([*SMALL, "activation=maxout", "activation.pieces=3"])
    )


@pytest.mark.parametrize(
    "alone",
    [["optimizer=lars"], ["model=cnn", "dataset=mnist1d"], ["train.grad_clip=1.0"], ["model=rnn", "dataset=mnist1d"]],
)
def test_trials_that_cannot_be_vectorized_have_no_batch_key(alone):
    assert batch_key(compose([*SMALL, *alone])) is None


def _members(configs):
    return [(f"trial{i}", 0, config) for i, config in enumerate(configs)]


def test_task_groups_fill_free_slots_and_respect_the_maximum():
    same = _members(_configs([], MEMBERS * 16))  # 64 members, one shape
    groups = _task_groups(same, batch_max=32, free=2)
    assert sorted(len(g) for g in groups) == [32, 32]
    sizes = [len(g) for g in _task_groups(same, batch_max=10, free=2)]
    assert len(sizes) == 7 and max(sizes) == 10 and sum(sizes) == 64
    assert len(_task_groups(same[:3], batch_max=32, free=8)) == 3  # every member its own slot
    assert all(len(g) == 1 for g in _task_groups(same, batch_max=1, free=2))  # batching off


def test_task_groups_never_mix_shapes():
    mixed = _members(_configs([]) + _configs(["batch_size=32"]) + _configs(["optimizer=lars"]))
    groups = _task_groups(mixed, batch_max=32, free=2)
    for group in groups:
        assert len({batch_key(config) for _, _, config in group}) == 1
    assert sum(len(g) for g in groups) == 12 and len([g for g in groups if batch_key(g[0][2]) is None]) == 4


# Seconds to train K members together for 10 epochs (MLP 4x128 on digits, one thread), measured on
# the project's 2-CPU machine on 2026-11-29: (normalization, batch_size, K) -> s.
MEASURED_S = {
    ("none", 32, 1): 0.40,
    ("none", 32, 4): 0.81,
    ("none", 32, 10): 1.39,
    ("none", 64, 1): 0.26,
    ("none", 64, 4): 0.51,
    ("none", 64, 10): 1.10,
    ("none", 128, 1): 0.18,
    ("none", 128, 4): 0.39,
    ("none", 128, 10): 1.12,
    ("batch", 32, 1): 0.76,
    ("batch", 32, 4): 1.10,
    ("batch", 32, 10): 1.82,
    ("batch", 64, 1): 0.43,
    ("batch", 64, 4): 0.75,
    ("batch", 64, 10): 1.41,
    ("batch", 128, 1): 0.27,
    ("batch", 128, 4): 0.56,
    ("batch", 128, 10): 1.27,
}


def test_task_cost_is_proportional_to_measured_task_times():
    seconds_per_cost = []
    for (norm, batch_size, k), seconds in MEASURED_S.items():
        config = compose([f"normalization={norm}", f"batch_size={batch_size}"])
        seconds_per_cost.append(seconds / task_cost([config] * k))
    middle = sorted(seconds_per_cost)[len(seconds_per_cost) // 2]
    assert all(0.75 < ratio / middle < 1.25 for ratio in seconds_per_cost), seconds_per_cost


def test_task_cost_grows_with_epochs_depth_and_width():
    base = task_cost([compose([])])
    for override in ("train.epochs=20", "model.depth=8", "model.width=256"):
        assert task_cost([compose([override])]) > 1.5 * base, override


def test_task_groups_come_costliest_first():
    small = _members(_configs(["batch_size=128"], MEMBERS[:2]))
    big = _members(_configs(["batch_size=32", "normalization=batch"]))
    middle = _members(_configs(["batch_size=64"]))
    groups = _task_groups(small + middle + big, batch_max=32, free=2)
    batch_sizes = [group[0][2]["batch_size"] for group in groups]
    assert batch_sizes == [32, 64, 128]
