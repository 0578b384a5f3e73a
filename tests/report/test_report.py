"""The study report: figures, the self-contained HTML page, the artifacts on the study's parent run.

One small real study per module (local Ray, sqlite Optuna and MLflow stores, no mocks) that has
complete, pruned and failed trials; its report is built by the study itself at the end. The
figure functions are also driven directly with hand-made data for the edge cases (nothing to draw,
one run, zeros everywhere), which costs no training.
"""

from __future__ import annotations

import math
import re
import statistics

import matplotlib.image
import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pipeline.cli import main
from pipeline.report import figures as plots
from pipeline.report.build import HTML_FILE, figure_specs
from pipeline.study.loop import run_study
from pipeline.study.storage import default_storage, open_storage

pytestmark = pytest.mark.timeout(300)

FIGURES = {spec.name: spec.title for spec in figure_specs([], None, "", "val_accuracy")}


def _args(root, name: str, *extra: str) -> list[str]:
    return [
        f"study.name={name}",
        f"study.output_dir={root}/studies",
        "study.progress=false",
        f"tracking.uri=sqlite:///{root}/mlflow.db",
        f"tracking.artifact_root={root}/artifacts",
        "cluster.num_cpus=2",
        "model.depth=2",
        "model.width=32",
        "train.probe_size=64",
        "tracking.log_weights=false",
        "study.sampler=random",
        "study.seed=0",
        "study.max_failure_rate=1.0",
        *extra,
    ]


@pytest.fixture(scope="module")
def studies(local_ray, tmp_path_factory):
    """Three studies in one store: "mix" (complete, pruned and failed trials), "gelu" (a grid over
    scale x depth with biases) and "allfail" (one failed trial).

    "mix" samples group norm with groups=7 on a 32-wide net (an invalid combination: FAIL) and
    prunes with the median pruner, one trial at a time so that pruning is deterministic.
    """
    root = tmp_path_factory.mktemp("report")
    # Through the command: the report is the run command's to build, once the study is over.
    assert (
        main(
            [
                "run",
                *_args(
                    root,
                    "mix",
                    "study.n_trials=7",
                    "train.epochs=2",
                    "study.pruner=median",
                    "cluster.max_concurrent=1",
                    "normalization.groups=7",
                    "space.initializer=choice(zeros, kaiming_normal, xavier_normal)",
                    "space.activation=choice(relu, tanh)",
                    "space.normalization=choice(none, group)",
                ),
            ]
        )
        == 0
    )
    # A gelu net with biases of std 0.2 (sigma_b^2 = 0.04) over scale x depth: its own computed
    # critical scale, and the trainable-region figure.
    assert (
        main(
            [
                "run",
                *_args(
                    root,
                    "gelu",
                    "study.sampler=grid",
                    "study.n_trials=null",
                    "train.epochs=1",
                    "activation=gelu",
                    "initializer=lecun_normal",
                    "initializer.bias=normal",
                    "initializer.bias_value=0.2",
                    "space=empty",
                    "space.scale=choice(0.5, 1.5, 3.0)",
                    "space.model.depth=choice(2, 4)",
                ),
            ]
        )
        == 0
    )
    run_study(
        _args(
            root,
            "allfail",
            "study.n_trials=1",
            "train.epochs=2",
            "normalization=group",
            "normalization.groups=7",
            "~space.normalization",
            "study.report=false",
        )
    )
    return root


def _html(root, name: str) -> str:
    return (root / "studies" / name / "report" / HTML_FILE).read_text()


def test_the_study_builds_its_report_with_every_figure_embedded(studies):
    page = _html(studies, "mix")
    assert "Figure skipped" not in page and "drawing this figure failed" not in page
    for name, title in FIGURES.items():
        match = re.search(rf"<img alt='{re.escape(title)}'[^>]*src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
        assert match, f"figure {name} ({title}) is not embedded"
        assert len(match.group(1)) > 10_000
    assert "src='http" not in page and "<script" not in page  # self-contained, opens offline


def test_every_figure_is_a_real_png(studies):
    folder = studies / "studies" / "mix" / "report"
    assert sorted(p.stem for p in folder.glob("*.png")) == sorted(FIGURES)
    for name in FIGURES:
        path = folder / f"{name}.png"
        pixels = matplotlib.image.imread(path)
        assert path.stat().st_size > 15_000, name
        assert pixels.shape[0] >= 250 and pixels.shape[1] >= 500, (name, pixels.shape)
        assert pixels[..., :3].std() > 0.05, f"{name} looks blank"


def test_the_report_is_logged_to_the_parent_run(studies):
    client = MlflowClient(f"sqlite:///{studies}/mlflow.db")
    experiment = client.get_experiment_by_name("mix")
    parent = client.search_runs([experiment.experiment_id], "tags.`initstudy.role` = 'study'")[0]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert logged == {f"report/{HTML_FILE}", *(f"report/{name}.png" for name in FIGURES)}
    assert parent.info.status == "FINISHED" and "report_error" not in parent.data.tags


def test_the_report_counts_complete_pruned_and_failed_trials(studies):
    states = [
        t.state
        for t in optuna.load_study(
            study_name="mix", storage=open_storage(default_storage(f"{studies}/studies", "mix"))
        ).trials
    ]
    assert {TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL} <= set(states)
    page = _html(studies, "mix")
    header = re.search(r"<tr><th>trials</th>(.*?)</tr><tr>(.*?)</tr>", page)
    heads = re.findall(r"<th>(\w+)</th>", header.group(1))
    counts = dict(zip(["trials", *heads], map(int, re.findall(r"<td>(\d+)</td>", header.group(2)))))
    assert counts["trials"] == len(states) == 7
    assert counts["pruned"] == states.count(TrialState.PRUNED)
    assert counts["failed"] == states.count(TrialState.FAIL)
    assert counts["complete"] + counts["diverged"] == states.count(TrialState.COMPLETE)
    assert re.search(r"<td>failed</td>.*?<td>ConfigError: normalization.groups=7 does not divide", page)  # says why


def test_report_command_on_a_study_whose_every_trial_failed_skips_figures_with_notes(studies, capsys):
    code = main(
        ["report", "allfail", f"tracking.uri=sqlite:///{studies}/mlflow.db", f"study.output_dir={studies}/studies"]
    )
    assert code == 0, capsys.readouterr().err
    assert "allfail/report/report.html" in capsys.readouterr().out
    page = _html(studies, "allfail")
    assert "<img alt='Trial outcomes'" in page  # one failed trial still has an outcome to count
    for title in (
        "Convergence by initializer",
        "Final accuracy: initializer × activation",
        "Signal propagation at initialization",
    ):
        assert re.search(rf"<h3>{re.escape(title)}</h3><p class='note'>Figure skipped: ", page), title
    assert "need at least 2 complete trials; this study has 0" in page


def test_report_for_an_unknown_study_exits_2_listing_the_studies(studies, capsys):
    code = main(
        ["report", "nope", f"tracking.uri=sqlite:///{studies}/mlflow.db", f"study.output_dir={studies}/studies"]
    )
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("error: unknown study 'nope'") and "allfail, gelu, mix" in lines[0]


def test_report_without_a_store_exits_2_and_creates_none(tmp_path, capsys):
    code = main(["report", "demo", f"tracking.uri=sqlite:///{tmp_path}/none.db"])
    assert code == 2 and "no MLflow store" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()


def test_a_gelu_study_with_biases_gets_its_own_computed_critical_scale(studies):
    from pipeline.config import ActivationConfig
    from pipeline.engine import theory
    from pipeline.record.readback import study_runs
    from pipeline.report.build import load_runs

    uri = f"sqlite:///{studies}/mlflow.db"
    parent, children = study_runs(uri, "gelu")
    runs = load_runs(uri, children, ["scale", "model.depth"])
    assert {r.axes["model.depth"] for r in runs} == {2, 4} and all("theory_chi1" in r.at_init for r in runs)
    sigma_b2 = statistics.median(r.at_init["theory_sigma_b2"] for r in runs)
    assert 0.02 < sigma_b2 < 0.07  # biases of std 0.2, never scaled
    found = plots.critical_scales(runs)
    assert list(found) == [("lecun_normal", "gelu")]
    # lecun_normal: sigma_w^2 = scale^2, so the critical scale is the root of the critical sigma_w^2
    expected = math.sqrt(theory.critical_sigma_w2(ActivationConfig(name="gelu"), sigma_b2))
    assert found["lecun_normal", "gelu"] == pytest.approx(expected, rel=0.05)
    assert found["lecun_normal", "gelu"] > 1.45  # neither tanh's 1 nor ReLU's 1.414 (2.3 at 0.05)
    fig = plots.plot_accuracy_vs_scale(runs, predicted=found)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    plots.plt.close(fig)
    assert f"gelu: predicted critical {found['lecun_normal', 'gelu']:.3g} (mean field)" in labels
    page = _html(studies, "gelu")
    assert "Figure skipped" not in page and "drawing this figure failed" not in page
    for title in ("Trainable region: depth × σ_w²", "Mean-field prediction against measurement"):
        assert re.search(rf"<img alt='{re.escape(title)}'[^>]*src='data:image/png;base64,", page), title


# ---- the figure functions on hand-made data ----------------------------------------------------


def _run(trial: int, init: str = "kaiming_normal", act: str = "relu", state: str = "COMPLETE", **kw) -> plots.TrialRun:
    layers = [
        {
            "epoch": e,
            "layer": i,
            "act_std": 0.5**i,
            "grad_norm": 0.0 if init == "zeros" else 2.0**-i,
            "weight_grad_norm": 0.1,
            "dead_fraction": 0.1 * e,
            **({"saturated_fraction": 0.2} if act == "tanh" else {}),
        }
        for e in (0, 2)
        for i in (1, 2, 3)
    ]
    curves = {"val_accuracy": [(0, 0.1), (1, 0.5), (2, 0.8)], "val_loss": [(0, 2.3), (1, math.inf), (2, 0.0)]}
    defaults = {
        "seed": 0,
        "diverged": False,
        "axes": {
            "initializer": init,
            "scale": 1.0 + trial,
            "activation": act,
            "normalization": "none",
            "batch_size": 64,
        },
        "final_accuracy": 0.5 + 0.01 * trial,
        "curves": curves,
        "layers": layers,
    }
    return plots.TrialRun(trial=trial, state=state, **{**defaults, **kw})


DRAWERS = {
    "outcomes": plots.plot_trial_outcomes,
    "convergence": lambda runs: plots.plot_convergence(runs, "initializer"),
    "heatmap": plots.plot_accuracy_heatmap,
    "category": plots.plot_accuracy_by_category,
    "scale": plots.plot_accuracy_vs_scale,
    "signal": plots.plot_signal_at_init,
    "health": plots.plot_unit_health,
}


@pytest.mark.parametrize("name", DRAWERS)
def test_figures_with_nothing_to_draw_say_why(name):
    with pytest.raises(plots.NoFigure, match=r"\w+"):
        DRAWERS[name]([plots.TrialRun(0, 0, "FAIL", False, {})] if name != "outcomes" else [])


@pytest.mark.parametrize("name", DRAWERS)
@pytest.mark.parametrize("case", ["one run", "mixed", "zeros and diverged", "recurrent"])
def test_figures_draw_small_and_degenerate_studies(name, case, tmp_path):
    runs = {
        "one run": [_run(0)],
        "mixed": [
            _run(0),
            _run(1, "xavier_normal", "tanh"),
            _run(2, state="PRUNED"),
            _run(3, state="FAIL", curves={}, layers=[]),
        ],
        "zeros and diverged": [
            _run(0, "zeros", final_accuracy=0.1),
            _run(1, diverged=True, final_accuracy=0.0, curves={"val_accuracy": [(0, 0.1)]}),
        ],
        # a recurrent net's table: a row per time step of its top layer
        "recurrent": [_run(0, layers=[{**row, "time_step": row["layer"]} for row in _run(0).layers])],
    }[case]
    fig = DRAWERS[name](runs)
    fig.savefig(tmp_path / "f.png")
    plots.plt.close(fig)
    assert (tmp_path / "f.png").stat().st_size > 5_000


def test_optuna_figures_handle_too_few_trials(tmp_path):
    from pipeline.report.build import _history, _importances

    study = optuna.create_study(direction="maximize")
    with pytest.raises(plots.NoFigure, match="no complete trial"):
        _history(study, "", "val_accuracy")
    study.add_trial(
        optuna.trial.create_trial(
            params={"scale": 1.0}, distributions={"scale": optuna.distributions.FloatDistribution(0.1, 10)}, value=0.5
        )
    )
    with pytest.raises(plots.NoFigure, match="at least 2 complete trials; this study has 1"):
        _importances(study, "", "val_accuracy")
    study.add_trial(
        optuna.trial.create_trial(
            params={"scale": 1.0}, distributions={"scale": optuna.distributions.FloatDistribution(0.1, 10)}, value=0.7
        )
    )
    with pytest.raises(plots.NoFigure, match="no study axis varies"):
        _importances(study, "", "val_accuracy")
    with pytest.raises(plots.NoFigure, match="storage gone"):
        _importances(None, "storage gone", "val_accuracy")
    fig = _history(study, "", "val_accuracy")
    plots.plt.close(fig)


def _scale_run(trial: int, act: str, scale: float, acc: float, init: str = "lecun_normal", **at_init) -> plots.TrialRun:
    axes = {"initializer": init, "scale": scale, "activation": act, "normalization": "none", "batch_size": 64}
    return _run(trial, init, act, axes=axes, final_accuracy=acc, at_init=at_init)


EDGE_OF_CHAOS = [
    ("tanh", 0.5, 0.1),
    ("tanh", 1.0, 0.9),
    ("tanh", 2.0, 0.6),
    ("relu", 1.0, 0.2),
    ("relu", 1.414, 0.8),
    ("relu", 2.0, 0.3),
]


def test_scale_figure_marks_reference_scales_beside_the_measured_best():
    runs = [_scale_run(i, *point) for i, point in enumerate(EDGE_OF_CHAOS)]
    fig = plots.plot_accuracy_vs_scale(runs, references={"tanh": 1.0, "relu": 1.414})
    labels = fig.axes[0].get_legend_handles_labels()[1]
    plots.plt.close(fig)
    assert "tanh: predicted critical 1 (study.reference_scales)" in labels
    assert "relu: predicted critical 1.41 (study.reference_scales)" in labels
    assert "tanh: measured best 1" in labels and "relu: measured best 1.41" in labels


def test_scale_figure_computes_each_initializers_critical_scale_from_the_runs_predictions():
    # sigma_w^2 per unit scale: 1 for LeCun, 2 for He with ReLU; critical sigma_w^2: tanh 1, ReLU 2
    critical = {"tanh": 1.0, "relu": 2.0}
    runs = [
        _scale_run(i, act, scale, acc, theory_sigma_w2=scale**2 * 1.01, theory_critical_sigma_w2=critical[act])
        for i, (act, scale, acc) in enumerate(EDGE_OF_CHAOS)
    ]
    runs += [
        _scale_run(10 + i, "relu", s, 0.5, "kaiming_normal", theory_sigma_w2=2 * s**2, theory_critical_sigma_w2=2.0)
        for i, s in enumerate((0.5, 1.0, 2.0))
    ]
    runs.append(_scale_run(20, "relu", 1.0, 0.5, "kaiming_normal", theory_sigma_w2=2.0))  # no critical point
    found = plots.critical_scales(runs)
    assert found == pytest.approx(
        {
            ("lecun_normal", "tanh"): 1 / 1.01**0.5,
            ("lecun_normal", "relu"): (2 / 1.01) ** 0.5,
            ("kaiming_normal", "relu"): 1.0,
        }
    )
    fig = plots.plot_accuracy_vs_scale(runs, references={"tanh": 0.9}, predicted=found)
    panels = {ax.get_title().split(":")[0]: ax.get_legend_handles_labels()[1] for ax in fig.axes}
    plots.plt.close(fig)
    assert set(panels) == {"kaiming_normal", "lecun_normal"}
    assert "relu: predicted critical 1 (mean field)" in panels["kaiming_normal"]
    assert "relu: predicted critical 1.41 (mean field)" in panels["lecun_normal"]
    assert "tanh: predicted critical 0.9 (study.reference_scales)" in panels["lecun_normal"]  # overrides


def _theory_run(trial: int, depth: int, sigma_w2: float, accuracy: float, seed: int = 0) -> plots.TrialRun:
    axes = {"initializer": "lecun_normal", "scale": sigma_w2**0.5, "activation": "tanh", "model.depth": depth}
    at_init = {
        "theory_sigma_w2": sigma_w2 * (1 + 0.002 * seed),
        "theory_sigma_b2": 0.05,
        "theory_grad_norm_ratio": sigma_w2 ** (depth / 20),
        "init_grad_norm_ratio": 1.1 * sigma_w2 ** (depth / 20),
        "theory_act_std_ratio": 0.5,
        "init_act_std_ratio": 0.45,
    }
    return _run(trial, seed=seed, axes={**_run(0).axes, **axes}, final_accuracy=accuracy, at_init=at_init)


def _region_runs(depths=(10, 40)) -> list[plots.TrialRun]:
    trainable = {(10, 1.0): 0.9, (10, 1.76): 0.95, (10, 3.0): 0.9, (40, 1.0): 0.1, (40, 1.76): 0.9, (40, 3.0): 0.3}
    return [
        _theory_run(i, depth, sigma_w2, trainable.get((depth, sigma_w2), 0.5), seed)
        for i, (depth, sigma_w2, seed) in enumerate(
            (d, s, seed) for d in depths for s in (1.0, 1.76, 3.0) for seed in (0, 1)
        )
    ]


def test_trainable_region_draws_the_measured_cells_under_the_computed_6_xi_c_curve():
    from pipeline.config import ActivationConfig
    from pipeline.engine import theory

    fig = plots.plot_trainable_region(_region_runs())
    ax = fig.axes[0]
    lines = {line.get_label(): line.get_data() for line in ax.get_lines()}
    cells = sorted(text.get_text() for text in ax.texts)
    plots.plt.close(fig)
    x, y = lines["6 ξ_c (mean field)"]
    tanh = ActivationConfig(name="tanh")
    for sigma_w2 in (1.2, 2.5):  # ordered and chaotic sides; the curve interpolates between evaluations
        expected = theory.predict(tanh, sigma_w2, 0.05, depth=1).trainable_depth
        assert np.interp(sigma_w2, x, y) == pytest.approx(expected, rel=0.02)
    assert "critical σ_w² = 1.76" in lines
    assert cells == ["0.10", "0.30", "0.90", "0.90", "0.90", "0.95"]  # a cell per (sigma_w^2, depth): mean of 2 seeds


def test_trainable_region_needs_two_depths_and_is_in_the_report_only_then():
    with pytest.raises(plots.NoFigure, match="two or more depths"):
        plots.plot_trainable_region(_region_runs(depths=(10,)))
    names = lambda runs: {spec.name for spec in figure_specs(runs, None, "", "val_accuracy")}  # noqa: E731
    assert "trainable_region" in names(_region_runs()) and "trainable_region" not in names(_region_runs((10,)))


def test_theory_figure_puts_measured_against_predicted_or_says_why_not():
    with pytest.raises(plots.NoFigure, match="no run has a mean-field prediction"):
        plots.plot_theory_vs_measured([_run(0), _run(1, "xavier_normal", "tanh")])
    runs = _region_runs()
    fig = plots.plot_theory_vs_measured(runs)
    points = np.concatenate([c.get_offsets() for c in fig.axes[0].collections])
    plots.plt.close(fig)
    expected = [(r.at_init["theory_grad_norm_ratio"], r.at_init["init_grad_norm_ratio"]) for r in runs]
    np.testing.assert_allclose(sorted(map(tuple, points.tolist())), sorted(expected))


def _weighable_study() -> optuna.Study:
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(
        lambda t: (
            t.suggest_float("scale", 0.1, 10, log=True) * 0.01
            + (t.suggest_categorical("activation", ["relu", "tanh"]) == "tanh")
        ),
        n_trials=12,
    )
    return study


def _in_line(study: optuna.Study) -> dict:
    from optuna.importance import FanovaImportanceEvaluator

    return dict(
        optuna.importance.get_param_importances(
            study,
            evaluator=FanovaImportanceEvaluator(seed=0),
            params=["activation", "scale"],
            target=lambda t: t.values[0],
        )
    )


def test_importances_from_the_helper_process_equal_optunas_in_line():
    from pipeline.report.importances import Importances

    study = _weighable_study()
    found = Importances(study).result()
    assert found == _in_line(study) and found["activation"] > found["scale"]


def test_a_failed_importances_helper_falls_back_to_computing_them_here(monkeypatch, caplog):
    from pipeline.report import importances

    monkeypatch.setattr(importances, "HELPER_MODULE", "pipeline.no_such_helper")
    study = _weighable_study()
    with caplog.at_level("WARNING", logger="pipeline.report.importances"):
        found = importances.Importances(study).result()
    assert found == _in_line(study)
    assert "helper failed" in caplog.text and "no_such_helper" in caplog.text


def test_closing_importances_stops_the_helper_and_removes_its_payload():
    from pipeline.report.importances import Importances

    started = Importances(_weighable_study())
    helper, payload = started._helper, started._file
    assert helper.poll() is None and payload.exists()  # still importing scikit-learn
    started.close()
    assert helper.poll() is not None and not payload.exists()


def test_an_evaluator_error_in_the_helper_is_the_figures_note_without_a_second_try(caplog):
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from pipeline.report import importances
    from pipeline.report.build import _importances

    study = optuna.create_study(direction="maximize")  # a resumed study whose space changed: dynamic
    for i, scale in enumerate(
        [
            (FloatDistribution(0.1, 10), 1.0),
            (FloatDistribution(0.1, 10), 2.0),
            (CategoricalDistribution(["a", "b"]), "a"),
            (CategoricalDistribution(["a", "b"]), "b"),
        ]
    ):
        study.add_trial(
            optuna.trial.create_trial(
                params={"scale": scale[1], "act": "xy"[i % 2]},
                value=0.1 * i,
                distributions={"scale": scale[0], "act": CategoricalDistribution(["x", "y"])},
            )
        )
    with caplog.at_level("WARNING", logger="pipeline.report.importances"):
        with pytest.raises(plots.NoFigure, match="Optuna could not compute the importances: ValueError: .*dynamic"):
            _importances(study, "", "val_accuracy")
    assert "helper failed" not in caplog.text
    with pytest.raises(importances.EvaluatorError):  # from the helper, not computed again here
        importances.Importances(study).result()
