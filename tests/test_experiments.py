"""The named experiments (conf/experiment/) plan, and small versions of them show the field's results.

Each test composes its experiment through ``plan_study`` (the YAML itself is exercised, as the
``run`` command would use it), takes trial configs of the experiment's own grid points, shrinks
them (fewer epochs, sometimes a smaller model) and runs the trial engine directly; one test runs a
whole tiny study on Ray. The thresholds come from shared/SCIENCE.md and the measured tables in
docs/results.md, with room for seed-to-seed spread but none for the opposite outcome.
"""

from __future__ import annotations

import math

import optuna
import pytest
import torch
import yaml
from torch import nn

from pipeline.config.composition import CONF_DIR
from pipeline.engine import diagnostics
from pipeline.engine.nn.initializers import INIT_LAYERS, LSUV_TOL
from pipeline.engine.train import prepare_trial, run_trial, train_trial
from pipeline.engine.weights import save_weights
from pipeline.study import space
from pipeline.study.loop import run_study
from pipeline.study.plan import plan_study
from pipeline.study.storage import default_storage, open_storage

pytestmark = pytest.mark.timeout(300)

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
LN10 = math.log(10)


@pytest.fixture
def plan(tmp_path):
    """``plan(name, *overrides)`` -> the experiment's StudyPlan, its stores under tmp_path."""

    def make(name: str, *overrides: str):
        return plan_study([f"experiment={name}", f"study.output_dir={tmp_path}/studies", *overrides])

    return make


def trial(plan, seed: int = 0, **params):
    """Run one grid point of ``plan`` (keys with dots passed as ``model__depth``) and return its result."""
    return run_trial(plan.trial_config(_params(params), seed))


def prepared(plan, seed: int = 0, **params):
    return prepare_trial(plan.trial_config(_params(params), seed))


def _params(params: dict) -> dict:
    return {key.replace("__", "."): value for key, value in params.items()}


def init(result, key: str) -> float:
    return result.history[0][f"init_{key}"]


# --- every experiment file -------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_plans_and_states_its_outcome(name, plan):
    text = (CONF_DIR / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_") and "# Expected" in text
    study_plan = plan(name)
    study = study_plan.cfg.study
    assert study.name == name and study.seeds >= 3
    assert study.sampler == "grid" and study.n_trials is None
    assert study_plan.n_trials == space.grid_size(study_plan.axes) >= 2
    declared = yaml.safe_load(text)["space"]
    assert [axis.key for axis in study_plan.axes] == list(declared)
    first = {key: values[0] for key, values in space.grid(study_plan.axes).items()}
    if first.get("initializer") != "pretrained":  # needs step 1's weights (test_pretrained_* below)
        study_plan.trial_config(first, seed=0)  # composes and validates


# --- resnet_init -------------------------------------------------------------------------------------


def test_an_unnormalized_resnet_trains_with_fixup_or_skipinit_not_with_he_alone(plan):
    """Zhang et al. 2019, De & Smith 2020: each block adds its branch's variance, so He init alone
    blows the signal up with depth; starting every block as its shortcut trains."""
    digits = plan("resnet_init", "dataset=digits", "dataset.augment=false", "dataset.input_norm=zscore",
                  "train.epochs=3", "train.threads=1", "batch_size=64", "optimizer.lr=0.05")  # fmt: skip
    runs = {
        ri: trial(digits, model__residual_init=ri, normalization="none", model__depth=20)
        for ri in ("none", "fixup", "skipinit")
    }
    # Every block its shortcut: the signal only thins where option A pads new channels with zeros
    # (twice, so about 1/2), while He init alone grows the stream block by block.
    assert 0.35 < init(runs["fixup"], "act_std_ratio") < 0.75
    assert init(runs["none"], "act_std_ratio") > 4 * init(runs["fixup"], "act_std_ratio")
    assert runs["none"].best_val_accuracy < 0.5 or runs["none"].diverged
    assert runs["fixup"].best_val_accuracy > 0.75 and runs["skipinit"].best_val_accuracy > 0.75


# --- depth_vanishing_exploding ---------------------------------------------------------------------


def test_depth_20_tiny_scale_vanishes_large_explodes_moderate_keeps_the_signal(plan):
    p = plan("depth_vanishing_exploding", "train.epochs=1", "train.probe_size=128")
    tiny, moderate, large = (trial(p, model__depth=20, scale=s) for s in (0.1, 1.0, 4.0))
    assert init(tiny, "act_std_ratio") < 1e-4 and init(tiny, "grad_norm_ratio") < 1e-4
    assert tiny.history[1]["train_loss"] == pytest.approx(LN10, abs=0.01)  # flat at ln C: nothing learns
    assert 0.1 < init(moderate, "act_std_ratio") < 10 and 0.1 < init(moderate, "grad_norm_ratio") < 10
    assert init(large, "act_std_ratio") > 1e4  # ~4^19 at init, before any step
    assert large.diverged and large.diverged_epoch == 1  # NaN loss: a result, not an error


# --- activation_matching ---------------------------------------------------------------------------


def test_deep_relu_needs_he_xavier_vanishes_in_backprop(plan):
    # One thread: a reduction's order must not depend on what ran before in this process. He's
    # accuracy after 4 epochs varies by seed (0.17-0.57), hence the mean of two.
    p = plan("activation_matching", "train.epochs=4", "train.probe_size=128", "train.threads=1")
    he = [trial(p, seed, activation="relu", initializer="kaiming_normal") for seed in (0, 1)]
    xavier = trial(p, activation="relu", initializer="xavier_normal")
    assert init(xavier, "grad_norm_ratio") < 1e-3 < 0.3 < init(he[0], "grad_norm_ratio") < 3  # 4e-5 vs ~1
    assert init(xavier, "act_std_ratio") < 1e-3
    assert xavier.final_val_accuracy < 0.2  # stalls at chance under SGD
    assert sum(r.final_val_accuracy for r in he) / len(he) > xavier.final_val_accuracy + 0.15


def test_deep_tanh_trains_with_xavier_deep_sigmoid_does_not(plan):
    p = plan("activation_matching", "train.epochs=3", "train.probe_size=128")
    tanh = trial(p, activation="tanh", initializer="xavier_normal")
    sigmoid = trial(p, activation="sigmoid", initializer="xavier_normal")
    assert tanh.final_val_accuracy > 0.6
    assert init(sigmoid, "grad_norm_ratio") < 1e-6  # sigmoid' <= 1/4 per layer, 30 layers
    assert sigmoid.final_val_accuracy < 0.2


# --- edge_of_chaos ---------------------------------------------------------------------------------


def test_tanh_at_the_critical_scale_beats_ordered_and_chaotic(plan):
    p = plan("edge_of_chaos", "train.epochs=3", "train.probe_size=128")
    acc = {s: trial(p, activation="tanh", scale=s).final_val_accuracy for s in (0.25, 1.0, 4.0)}
    assert acc[1.0] > 0.8
    assert acc[1.0] > acc[0.25] + 0.4 and acc[1.0] > acc[4.0] + 0.4


def test_relu_signal_is_critical_at_sqrt2(plan):
    p = plan("edge_of_chaos", "train.probe_size=128")
    ratio = {}
    for s in (1.0, 1.414, 2.0):
        prep = prepared(p, activation="relu", scale=s)
        x, y = prep.splits.x_train[:128], prep.splits.y_train[:128]
        ratio[s] = diagnostics.probe(prep.model, x, y).summary["grad_norm_ratio"]
    assert ratio[1.0] < 1e-2 and 0.3 < ratio[1.414] < 3 and ratio[2.0] > 1e2


# --- orthogonal_deep_linear ------------------------------------------------------------------------


def end_to_end_singular_values(model: nn.Module) -> torch.Tensor:
    """Singular values of W_L ... W_1, the hidden stack of a linear (identity-activation) MLP."""
    product = None
    for block in model.blocks:
        weight = block.layer.weight.detach().double()
        product = weight if product is None else weight @ product
    return torch.linalg.svdvals(product)


def test_orthogonal_deep_linear_map_is_an_isometry_gaussian_spreads(plan):
    p = plan("orthogonal_deep_linear")
    orthogonal = end_to_end_singular_values(prepared(p, initializer="orthogonal", model__depth=16).model)
    gaussian = end_to_end_singular_values(prepared(p, initializer="lecun_normal", model__depth=16).model)
    assert torch.allclose(orthogonal, torch.ones_like(orthogonal), atol=1e-6)
    assert gaussian.max() / gaussian.min() > 10  # measured ~1e2 at depth 16, width 128


# --- normalization_softens -------------------------------------------------------------------------


def test_batch_norm_shrinks_the_spread_of_accuracy_across_scales(plan):
    # Four epochs, one thread: at three, batch norm's slow start at scale 4 (lr_eff ~ lr / scale^2)
    # leaves its spread level with the plain net's on some CPUs.
    p = plan("normalization_softens", "train.epochs=4", "train.probe_size=128", "train.threads=1")
    runs = {
        (norm, residual): [trial(p, normalization=norm, model__residual=residual, scale=s) for s in (0.25, 1.0, 4.0)]
        for norm, residual in (("none", False), ("batch", False), ("batch", True))
    }
    acc = {key: [r.final_val_accuracy for r in rs] for key, rs in runs.items()}
    spread = {key: torch.tensor(values).std().item() for key, values in acc.items()}
    plain = ("none", False)
    assert acc[plain][0] < 0.15 and runs[plain][2].diverged  # scale 0.25 vanishes, scale 4 diverges
    assert min(acc["batch", False]) > 0.2 and not any(r.diverged for r in runs["batch", False])
    assert spread["batch", False] < spread[plain]  # at scale 4 BN still learns slowly: lr_eff ~ lr / scale^2
    assert spread["batch", True] < 0.1 and spread["batch", True] < spread[plain] / 3


# --- batch_size_lr ---------------------------------------------------------------------------------


def test_large_lr_needs_a_large_batch_unless_batch_norm(plan):
    # Means over two seeds at lr 0.1: where lr 0.05 tips a batch of 16 over varies with the CPU's
    # rounding (one seed's run is chaotic there); at 0.1 the gap is wide on every machine tried.
    p = plan("batch_size_lr", "train.epochs=2", "train.probe_size=128")

    def mean_accuracy(**params) -> float:
        runs = [trial(p, seed, optimizer__lr=0.1, **params) for seed in (0, 1)]
        return sum(0.0 if r.diverged else r.final_val_accuracy for r in runs) / len(runs)

    assert mean_accuracy(normalization="none", batch_size=16) < 0.3
    assert mean_accuracy(normalization="none", batch_size=256) > 0.5
    assert mean_accuracy(normalization="batch", batch_size=16) > 0.8


# --- pretrained ------------------------------------------------------------------------------------


def test_pretrained_init_beats_random_on_few_examples(plan, tmp_path):
    source_plan = plan(
        "pretrained",
        "dataset.classes=[0,1,2,3,4]",
        "dataset.max_train=null",
        "train.epochs=8",
        "batch_size=64",
        "optimizer.lr=0.02",
    )
    source = prepared(source_plan, initializer="kaiming_normal")
    assert train_trial(source).final_val_accuracy > 0.6
    save_weights(source.model, tmp_path / "source.safetensors")
    p = plan("pretrained", f"initializer.path={tmp_path / 'source.safetensors'}", "train.probe_size=64")
    pretrained = [trial(p, seed, initializer="pretrained", dataset__max_train=100) for seed in (0, 1)]
    scratch = [trial(p, seed, initializer="kaiming_normal", dataset__max_train=100) for seed in (0, 1)]
    mean = lambda runs: sum(r.final_val_accuracy for r in runs) / len(runs)  # noqa: E731
    assert mean(pretrained) > mean(scratch) + 0.1


# --- beyond_textbook: LSUV and delta-orthogonal ----------------------------------------------------


def layer_variances(model: nn.Module, x: torch.Tensor) -> list[float]:
    """Var of every Linear/Conv layer's output on ``x`` (train mode, as LSUV measured it)."""
    outputs = []
    handles = [
        m.register_forward_hook(lambda mod, inp, out: outputs.append(float(out.double().var())))
        for m in model.modules()
        if isinstance(m, INIT_LAYERS)
    ]
    with torch.no_grad():
        model.train()(x)
    for handle in handles:
        handle.remove()
    return outputs


def test_lsuv_trial_has_unit_output_variance_per_layer_and_rescues_relu(plan):
    p = plan("beyond_textbook", "train.epochs=1", "train.probe_size=256")
    prep = prepared(p, model="mlp", activation="relu", initializer="lsuv")
    probe = prep.splits.x_train[: prep.cfg.train.probe_size]  # the batch prepare_trial gave LSUV
    variances = layer_variances(prep.model, probe)
    assert len(variances) == 33 and all(abs(v - 1) < LSUV_TOL for v in variances)
    lsuv = train_trial(prep)
    orthogonal = trial(p, model="mlp", activation="relu", initializer="orthogonal")  # LSUV's own start
    assert init(orthogonal, "grad_norm_ratio") < 1e-3
    assert 0.3 < init(lsuv, "grad_norm_ratio") < 3 and 0.3 < init(lsuv, "act_std_ratio") < 3


def test_delta_orthogonal_cnn_keeps_its_signal_through_32_blocks(plan):
    p = plan("beyond_textbook", "train.probe_size=128")
    summary = {}
    for name in ("delta_orthogonal", "orthogonal"):
        prep = prepared(p, model="cnn", activation="tanh", initializer=name)
        x, y = prep.splits.x_train[:128], prep.splits.y_train[:128]
        summary[name] = diagnostics.probe(prep.model, x, y).summary
        if name == "delta_orthogonal":
            for block in prep.model.blocks:
                weight = block.layer.weight.detach().double()  # (out, in, 3, 3)
                tap = weight[:, :, 1, 1]
                assert torch.allclose(tap.T @ tap, torch.eye(weight.shape[1], dtype=torch.float64), atol=1e-5)
                assert torch.count_nonzero(weight) == torch.count_nonzero(tap)
    assert 0.2 < summary["delta_orthogonal"]["act_std_ratio"] < 5
    assert 0.3 < summary["delta_orthogonal"]["grad_norm_ratio"] < 3
    assert summary["orthogonal"]["act_std_ratio"] < 0.1  # the full orthogonal kernel loses it on 4x4 maps


# --- width_transfer --------------------------------------------------------------------------------


def test_a_rate_tuned_at_width_64_transfers_to_512_under_mup_not_standard(plan):
    """At lr 0.03, 3x width 64's best, seed 0 (docs/results.md: final training loss 0.16 at width
    64; at 512, standard 1.2, muP 0.05): widening breaks the standard net, not the muP one."""
    p = plan("width_transfer")

    def loss(parametrization: str, width: int) -> float:
        result = trial(p, model__parametrization=parametrization, model__width=width, optimizer__lr=0.03)
        return math.inf if result.diverged else result.history[-1]["train_loss"]

    base = loss("standard", 64)  # muP at its base width is the same net
    assert loss("standard", 512) > 3 * base
    assert loss("mup", 512) < 1.5 * base


# --- trainable_depth, and the critical scales the report computes (mean-field theory) ---------------


def _critical_scales(preps: dict) -> dict:
    """The report's critical scale per (initializer, activation), from prepared trials' predictions."""
    from pipeline.report.figures import TrialRun, critical_scales

    axes = {
        key: {"initializer": p.cfg.initializer.name, "activation": key[0], "scale": key[1]} for key, p in preps.items()
    }
    return critical_scales(
        [TrialRun(0, 0, "COMPLETE", False, axes[key], at_init=p.at_init) for key, p in preps.items()]
    )


def test_edge_of_chaos_critical_scales_are_computed_not_typed(plan):
    """tanh 1 and ReLU sqrt 2 at sigma_b = 0 come out of each trial's weights; biases of variance
    0.05 move tanh's to sqrt 1.761 (Schoenholz et al.), and ReLU then has none."""
    p = plan("edge_of_chaos", "train.probe_size=64")
    assert not p.cfg.study.reference_scales
    points = (("tanh", 2.0), ("relu", 0.5))  # any scale: the critical one is read off the weights
    found = _critical_scales({(act, s): prepared(p, activation=act, scale=s) for act, s in points})
    assert found["lecun_normal", "tanh"] == pytest.approx(1.0, rel=0.01)
    assert found["lecun_normal", "relu"] == pytest.approx(math.sqrt(2), rel=0.01)
    biased = plan("edge_of_chaos", "train.probe_size=64", "initializer.bias=normal", "initializer.bias_value=0.2236")
    found = _critical_scales({(act, 1.0): prepared(biased, activation=act, scale=1.0) for act in ("tanh", "relu")})
    assert found == {("lecun_normal", "tanh"): pytest.approx(math.sqrt(1.761), rel=0.03)}


def test_trainable_depth_at_40_layers_the_critical_net_trains_the_ordered_one_does_not(plan):
    """sigma_w^2 = 1.0 has 6 xi_c = 22 < 40 layers: its backprop signal vanishes (ratio ~2e-3, as
    predicted) and it does not train; the critical net (sigma_w^2 = 1.76) does; the chaotic one
    (4.0, 6 xi_c = 42) explodes (~3e2) and learns slower."""
    p = plan("trainable_depth", "train.epochs=3", "train.probe_size=128", "train.threads=1")
    runs = {s2: trial(p, model__depth=40, scale=scale) for s2, scale in ((1.0, 1.0), (1.76, 1.327), (4.0, 2.0))}
    for result in runs.values():  # the measured gradient ratio follows the mean-field prediction
        at_init = result.history[0]
        assert 0.6 < at_init["init_grad_norm_ratio"] / at_init["theory_grad_norm_ratio"] < 1.6
    assert runs[1.0].history[0]["theory_trainable_depth"] < 40 < runs[4.0].history[0]["theory_trainable_depth"]
    assert init(runs[1.0], "grad_norm_ratio") < 1e-2 and init(runs[4.0], "grad_norm_ratio") > 1e2
    accuracy = {s2: r.final_val_accuracy for s2, r in runs.items()}
    assert accuracy[1.76] > 0.6 and accuracy[1.0] < 0.25
    assert accuracy[1.76] > accuracy[4.0] + 0.2  # measured 0.72-0.74 against 0.28-0.31 (seeds 0, 1)


# --- symmetry: one whole (tiny) study on a local Ray, last: an idle Ray slows the tests after it ---


def test_symmetry_study_zero_init_stays_at_chance_random_init_learns(local_ray, tmp_path):
    run_study(
        [
            "experiment=symmetry",
            f"study.output_dir={tmp_path}/studies",
            "study.seeds=2",
            "study.progress=false",
            "study.report=false",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"tracking.artifact_root={tmp_path}/a",
            "tracking.log_weights=false",
            "cluster.num_cpus=2",
            "model.width=32",
            "train.epochs=4",
            "train.probe_size=64",
        ]
    )
    study = optuna.load_study(
        study_name="symmetry", storage=open_storage(default_storage(f"{tmp_path}/studies", "symmetry"))
    )
    accuracy = {t.params["initializer"]: t.value for t in study.trials}
    assert set(accuracy) == {"zeros", "constant", "normal"}
    assert all(t.user_attrs["n_seeds"] == 2 for t in study.trials)
    assert accuracy["zeros"] < 0.2 and accuracy["constant"] < 0.35
    assert accuracy["normal"] > 0.8
