"""The study report: a study's figures as PNGs and one self-contained HTML page.

``build_report`` reads a study back from its record: the MLflow parent run and trial runs (the five
axes, final accuracy, validation curves, ``diagnostics/layers.csv``) and the Optuna storage named
by the parent run's ``storage`` param (importances, history, summary tables). It writes
``<study.output_dir>/<study>/report/`` (``report.html`` with every image embedded as base64, plus
one PNG per figure) and logs that folder to the parent run under ``report/``. A figure the data
cannot support (one trial, every trial failed, no diagnostics) is replaced by a note saying why.
MLflow is read through ``pipeline.record``; the figures live in ``pipeline.report.figures``.
"""

from __future__ import annotations

import base64
import csv
import datetime
import hashlib
import html
import json
import logging
import statistics
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import matplotlib.pyplot as plt

from pipeline.config import AXES
from pipeline.config.stores import without_password
from pipeline.record import names
from pipeline.record.artifacts import download_artifact
from pipeline.record.readback import RunRecord, Wanted, many_histories, study_parent, trial_runs
from pipeline.record.runs import Run
from pipeline.report import figures as plots
from pipeline.report.importances import EvaluatorError, Importances, NothingToWeigh

log = logging.getLogger(__name__)

REPORT_DIR = names.REPORT_DIR
HTML_FILE = "report.html"
CURVES = ("val_accuracy", "val_loss")
LAYERS_ARTIFACT = names.LAYERS_ARTIFACT
AT_INIT_PREFIXES = ("init_", "theory_", "isometry_")  # epoch 0's measured and predicted metrics
#: Config values the trainable-region figure reads, axes or not: read when the study's runs span depths.
THEORY_KEYS = (plots.DEPTH, "activation.slope")
RUN_TAGS = (
    names.OPTUNA_TRIAL_TAG,
    names.SEED_TAG,
    names.OPTUNA_STATE_TAG,
    names.DIVERGED_TAG,
    names.FAILURE_REASON_TAG,
)
#: Runs whose curves and per-layer tables the report reads, at most (plus ``SAMPLE_PER_VALUE``
#: below): the four figures drawn from them show statistics over runs, which a sample this size
#: estimates well, and reading them costs a run each (a curve, an artifact).
SAMPLE_RUNS = 1000
SAMPLE_KEYS = ("initializer", "activation")  # what those figures group by: every value keeps some runs
SAMPLE_PER_VALUE = 10
TABLE_ROWS = 2000  # trials listed in the page's trials table, at most


@dataclass
class FigureSpec:
    """One figure of the report: where it goes, what it is called, how to draw it."""

    name: str  # the PNG's file stem
    section: str
    title: str  # also the <img> alt text
    caption: str  # how to read it
    draw: Callable[[], object]  # -> matplotlib Figure, or raises report.NoFigure


@dataclass
class Drawn:
    spec: FigureSpec
    path: Optional[Path]  # None: skipped, see note
    note: str = ""


def build_report(
    study: str,
    uri: str,
    output_dir: str,
    storage: Optional[str] = None,
    log_to_run: bool = True,
    sample_size: int = SAMPLE_RUNS,
) -> Path:
    """Draw every figure of ``study``, write its HTML page and log the folder to the study's parent run.

    Args:
        study: the study's name (its MLflow experiment and its Optuna study).
        uri: the MLflow tracking URI.
        output_dir: ``study.output_dir``; the report is written to ``<output_dir>/<study>/report/``.
        storage: the Optuna storage URL; default: the parent run's ``storage`` param.
        log_to_run: log the report folder to the parent run (artifact dir ``report/``).
        sample_size: read the curves and per-layer tables of at most this many runs (``choose_sample``).

    Returns:
        The path of ``report.html``.

    Raises:
        ConfigError: the store holds no such study (the message lists the studies it holds).
    """
    parent = study_parent(uri, study)
    children = trial_runs(uri, parent, wanted(_space_keys(parent)))
    optuna_study, optuna_note = load_optuna(study, storage or parent.params.get(names.STORAGE_PARAM), output_dir)
    importances = _start_importances(optuna_study)  # in a helper process, while this one reads and draws
    try:
        sample = choose_sample(children, sample_size)
        runs = load_runs(uri, children, _space_keys(parent), sample)
        objective = (parent.params.get(names.OBJECTIVES_PARAM) or "val_accuracy").split(",")[0]
        out = _fresh_dir(Path(output_dir, study, REPORT_DIR))
        references = json.loads(parent.tags.get(names.REFERENCE_SCALES_TAG) or "{}")
        specs = figure_specs(runs, optuna_study, optuna_note, objective, references, importances, sample.note())
        drawn = [_draw(spec, out) for spec in specs]
    finally:
        if isinstance(importances, Importances):
            importances.close()
    page = _html(study, uri, parent, runs, optuna_study, objective, drawn)
    (out / HTML_FILE).write_text(page, encoding="utf-8")
    if log_to_run:
        Run(uri, parent.run_id).log_dir(out, REPORT_DIR)
    return out / HTML_FILE


# ---- reading the study back ---------------------------------------------------------------------


def wanted(space_keys: Iterable[str] = ()) -> Wanted:
    """What the report reads of each trial run: the axes (those beyond the five too), the tags that
    say how it ended, its final accuracy and the epoch-0 metrics the figures read."""
    return Wanted(
        params=(*AXES, *_extra_keys(space_keys)),
        tags=RUN_TAGS,
        metrics=("final_accuracy", *plots.AT_INIT_KEYS),
    )


def _extra_keys(space_keys: Iterable[str]) -> list[str]:
    space_keys = list(space_keys)
    theory = THEORY_KEYS if plots.DEPTH in space_keys else ()
    return [key for key in dict.fromkeys([*space_keys, *theory]) if key not in AXES]


@dataclass
class Sample:
    """The runs whose curves and per-layer tables the report reads: every run (but failed ones
    that logged nothing), or, past ``bound`` of them, a fixed pseudo-random draw (``choose_sample``)."""

    run_ids: list[str]
    out_of: int  # the runs it was drawn from
    bound: int

    def note(self) -> str:
        """What the figures drawn from the sample say about it ("" when it holds every run)."""
        if len(self.run_ids) >= self.out_of:
            return ""
        return (
            f"Drawn from a sample: the curves and per-layer tables of {len(self.run_ids):,} of the study's "
            f"{self.out_of:,} runs, chosen by a hash of the run id (a fixed pseudo-random "
            f"draw of {self.bound:,}, the same at every rebuild), plus runs of any {' or '.join(SAMPLE_KEYS)} "
            f"the draw left with fewer than {SAMPLE_PER_VALUE}; n counts sampled runs. Figures without such a "
            "note, and the summary tables, use every run."
        )


def choose_sample(children: list[RunRecord], bound: int = SAMPLE_RUNS) -> Sample:
    """The runs whose curves and layers the report reads: all (but failed runs that logged nothing),
    up to ``bound``; beyond, the ``bound`` first by a hash of their run id, then, for each value of
    ``SAMPLE_KEYS`` with fewer than ``SAMPLE_PER_VALUE`` runs in the draw, its next runs by hash."""
    eligible = sorted((r for r in children if _logged(r)), key=lambda r: _hash(r.run_id))
    chosen = eligible[:bound]
    taken = {r.run_id for r in chosen}
    for key in SAMPLE_KEYS if len(eligible) > bound else ():
        held = Counter(r.params.get(key) for r in chosen)
        for record in eligible[bound:]:
            value = record.params.get(key)
            if held[value] < SAMPLE_PER_VALUE and record.run_id not in taken:
                chosen.append(record)
                taken.add(record.run_id)
                held[value] += 1
    return Sample([r.run_id for r in chosen], len(eligible), bound)


def _logged(record: RunRecord) -> bool:
    """Whether a run may have curves: it has a metric, or it did not fail (a pruned run without
    diagnostics has only its curves, which the bulk read does not fetch)."""
    failed = record.tags.get(names.OPTUNA_STATE_TAG) == "FAIL" or record.status in ("FAILED", "KILLED")
    return bool(record.metrics) or not failed


def _hash(run_id: str) -> bytes:
    return hashlib.blake2b(run_id.encode(), digest_size=8).digest()


def load_runs(
    uri: str, children: list[RunRecord], space_keys: Iterable[str] = (), sample: Optional[Sample] = None
) -> list[plots.TrialRun]:
    """The study's trial runs as plain data, in trial and seed order; the runs of ``sample`` (by
    default ``choose_sample``'s) with their curves and per-layer diagnostics.

    Args:
        uri: The MLflow tracking URI.
        children: The trial runs.
        space_keys: The study's axes (``space.*`` of its parent run); those beyond the five
            axes (``model.depth``, ``initializer.std``...) join each run's ``axes``.
        sample: Which runs' curves and layers to read (one bulk read of their curves, an artifact each).
    """
    extra = _extra_keys(space_keys)
    sample = sample or choose_sample(children)
    records = {child.run_id: child for child in children}
    runs = {run_id: _trial_run(record, extra) for run_id, record in records.items()}
    sampled = [run_id for run_id in sample.run_ids if run_id in runs]
    for run_id, curves in many_histories(uri, sampled, CURVES).items():
        runs[run_id].curves = curves
    with tempfile.TemporaryDirectory(prefix="initstudy-report-") as tmp:
        for run_id in sampled:
            artifact_uri = records[run_id].artifact_uri
            runs[run_id].layers = _read_layers(
                download_artifact(uri, run_id, LAYERS_ARTIFACT, Path(tmp, run_id), artifact_uri)
            )
    return sorted(runs.values(), key=lambda r: (r.trial, r.seed))


def _space_keys(parent: RunRecord) -> list[str]:
    return [key.removeprefix("space.") for key in parent.params if key.startswith("space.")]


def _trial_run(record: RunRecord, extra: Iterable[str] = ()) -> plots.TrialRun:
    state = record.tags.get(names.OPTUNA_STATE_TAG, "RUNNING")
    if state == "RUNNING" and record.status in ("FAILED", "KILLED"):
        state = "FAIL"  # a run a dead driver left behind: its trial was told FAIL
    return plots.TrialRun(
        trial=int(record.tags.get(names.OPTUNA_TRIAL_TAG, -1)),
        seed=int(record.tags.get(names.SEED_TAG, 0)),
        state=state,
        diverged=record.tags.get(names.DIVERGED_TAG) == "true",
        axes={**_axes(record.params), **_other_axes(record.params, extra)},
        final_accuracy=record.metrics.get("final_accuracy"),
        reason=record.tags.get(names.FAILURE_REASON_TAG, ""),
        at_init={k: v for k, v in record.metrics.items() if k.startswith(AT_INIT_PREFIXES)},
    )


def _axes(params: dict[str, str]) -> dict:
    converters = {"scale": float, "batch_size": int}
    axes = {}
    for key in AXES:
        if key in params:
            try:
                axes[key] = converters.get(key, str)(params[key])
            except ValueError:
                axes[key] = params[key]
    return axes


def _other_axes(params: dict[str, str], keys: Iterable[str]) -> dict:
    """Config values beyond the five axes: numbers as int or float, anything else as text."""
    return {key: _number(params[key]) for key in keys if key in params}


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _read_layers(path: Optional[Path]) -> list[dict]:
    if path is None or not path.exists():
        return []
    with path.open(newline="") as handle:
        return [{key: _cell(key, value) for key, value in row.items()} for row in csv.DictReader(handle)]


def _cell(key: str, value: Optional[str]):
    """A layers.csv cell: epoch/layer/time_step as ints, numbers as floats, empty as None, else text."""
    if value in ("", None):
        return None
    try:
        number = float(value)
    except ValueError:
        return value  # a column we do not know: keep it, the figures ignore it
    return int(number) if key in ("epoch", "layer", "time_step") else number


def load_optuna(study: str, storage: Optional[str], output_dir: str):
    """``(optuna.Study, "")``, or ``(None, why)`` when the storage is gone or holds no such study."""
    import optuna

    from pipeline.study.storage import default_storage, open_storage, storage_file

    # A recorded storage URL has its password masked: reopened without it, the database client
    # takes it from its own sources (PGPASSFILE, PGPASSWORD).
    urls = [without_password(u) for u in (storage, default_storage(output_dir, study)) if u]
    reason = f"no Optuna storage found (looked for {', '.join(dict.fromkeys(urls))})"
    for url in dict.fromkeys(urls):
        if storage_file(url) is not None and not storage_file(url).exists():
            continue  # load_study would create an empty database or journal there
        try:
            return optuna.load_study(study_name=study, storage=open_storage(url)), ""
        except Exception as err:  # KeyError: no such study in that storage
            reason = f"the Optuna study could not be opened from {url} ({type(err).__name__}: {err})"
    return None, reason


# ---- the figures ----------------------------------------------------------------------------------


def figure_specs(
    runs: list[plots.TrialRun],
    optuna_study,
    optuna_note: str,
    objective: str,
    references: Optional[dict[str, float]] = None,
    importances=None,
    sample_note: str = "",
) -> list[FigureSpec]:
    """Every figure of the report, in page order. ``importances``: from ``_start_importances``, if
    the caller started them early (else they are computed when their figure is drawn);
    ``sample_note``: ``Sample.note()``, added to the captions of the figures drawn from the sample."""
    sampled = f" {sample_note}" if sample_note else ""
    return [
        *_outcome_figures(runs, sampled),
        *_accuracy_figures(runs, references),
        *_signal_figures(runs, sampled),
        *_optuna_figures(optuna_study, optuna_note, objective, importances),
    ]


def _outcome_figures(runs: list[plots.TrialRun], sampled: str) -> list[FigureSpec]:
    """Trial outcomes and convergence curves."""
    return [
        FigureSpec(
            "trial_outcomes",
            "Outcomes",
            "Trial outcomes",
            "How many trials completed, diverged (a non-finite training loss in some seed), were pruned by "
            "the Optuna pruner or failed, overall and per initializer.",
            lambda: plots.plot_trial_outcomes(runs),
        ),
        FigureSpec(
            "convergence_by_initializer",
            "Convergence",
            "Convergence by initializer",
            "Validation accuracy and loss per epoch (epoch 0 = the network as initialized), one line per "
            "initializer: the mean over its runs (every seed of every trial) with a ± 1 std band. Failed "
            "runs are left out; pruned runs count until they stopped." + sampled,
            lambda: plots.plot_convergence(runs, "initializer"),
        ),
        FigureSpec(
            "convergence_by_activation",
            "Convergence",
            "Convergence by activation",
            "The same curves grouped by activation function." + sampled,
            lambda: plots.plot_convergence(runs, "activation"),
        ),
    ]


def _accuracy_figures(runs: list[plots.TrialRun], references: Optional[dict[str, float]]) -> list[FigureSpec]:
    """Final accuracy by initializer x activation, by normalization and batch size, against scale."""
    return [
        FigureSpec(
            "final_accuracy_heatmap",
            "Final accuracy",
            "Final accuracy: initializer × activation",
            "Held-out test accuracy after the last epoch, mean ± std over the complete runs in each cell "
            "(n runs; diverged runs included, pruned and failed ones not). Grey: no run.",
            lambda: plots.plot_accuracy_heatmap(runs),
        ),
        FigureSpec(
            "final_accuracy_by_normalization_batch_size",
            "Final accuracy",
            "Final accuracy by normalization and batch size",
            "Distribution of the final test accuracy of the complete runs per normalization and per batch "
            "size: box = quartiles and median, dots = runs, n under each box.",
            lambda: plots.plot_accuracy_by_category(runs),
        ),
        FigureSpec(
            "final_accuracy_vs_scale",
            "Final accuracy",
            "Final accuracy against scale",
            "Final test accuracy against the initialization scale (which multiplies the standard deviation "
            "the scheme would give; log axis); the thin line joins the mean per distinct scale, x marks a "
            "diverged run. Where the mean-field theory applies, a panel per initializer and a colour per "
            "activation, the critical scale dashed: scale × √(critical σ_w² / σ_w²), σ_w² and σ_b² read off "
            "each run's weights at init, median over runs (study.reference_scales, if set, overrides it); "
            "a star on the best mean measured. Otherwise one colour per initializer.",
            lambda: plots.plot_accuracy_vs_scale(runs, references=references, predicted=plots.critical_scales(runs)),
        ),
    ]


def _signal_figures(runs: list[plots.TrialRun], sampled: str) -> list[FigureSpec]:
    """Signal propagation at init, unit health, theory beside measurement, the trainable region."""
    return [
        FigureSpec(
            "signal_at_init",
            "Signal propagation at initialization",
            "Signal propagation at initialization",
            "Per hidden layer, at initialization (epoch 0 of diagnostics/layers.csv): the std of the layer's "
            "output and the norm of the backprop gradient with respect to its pre-activation, geometric mean "
            "over runs. Flat lines propagate; a line falling with depth vanishes, a rising one explodes "
            "(a backprop ratio first/last of 0.7-1.4 is healthy)." + sampled,
            lambda: plots.plot_signal_at_init(runs),
        ),
        FigureSpec(
            "unit_health",
            "Signal propagation at initialization",
            "Dead and saturated units",
            "Share of hidden units that are dead (activation input ≤ 0 on every probe sample) and, for "
            "tanh/sigmoid, saturated, at initialization and after the last epoch, mean over layers and runs." + sampled,
            lambda: plots.plot_unit_health(runs),
        ),
        FigureSpec(
            "theory_vs_measured",
            "Theory beside measurement",
            "Mean-field prediction against measurement",
            "Per run at initialization: the backprop gradient ratio ‖∂L/∂h₁‖/‖∂L/∂h_L‖ and the activation std "
            "ratio (last/first hidden layer) the probe measured (init_*) against the mean-field prediction for "
            "the same weights (theory_*), log-log, y = x solid, a factor 2 dotted. Only runs the theory applies "
            "to: plain MLPs and CNNs (no normalization, no residual links) with an elementwise activation.",
            lambda: plots.plot_theory_vs_measured(runs),
        ),
        *_trainable_region(runs),
    ]


def _optuna_figures(optuna_study, optuna_note: str, objective: str, importances) -> list[FigureSpec]:
    """Optuna's importances and history."""
    weighed = f" {importances.note}" if isinstance(importances, Importances) and importances.note else ""
    return [
        FigureSpec(
            "param_importances",
            "Optuna",
            "Parameter importances",
            f"Optuna's fANOVA importance of each study axis for the objective {objective} (the share of its "
            "variance each axis explains, over the complete trials; seed 0 of the evaluator's forest)." + weighed,
            lambda: _importances(optuna_study, optuna_note, objective, importances),
        ),
        FigureSpec(
            "optimization_history",
            "Optuna",
            "Optimization history",
            f"The objective ({objective}, mean over seeds) of every complete trial in the order Optuna asked "
            "for them, with the best value so far; pruned and failed trials are marked along the bottom.",
            lambda: _history(optuna_study, optuna_note, objective),
        ),
    ]


def _trainable_region(runs: list[plots.TrialRun]) -> list[FigureSpec]:
    """The trainable-region figure, for a study whose runs span depths (else nothing, not a note)."""
    if len({r.axes.get(plots.DEPTH) for r in runs} - {None}) < 2:
        return []
    return [
        FigureSpec(
            "trainable_region",
            "Theory beside measurement",
            "Trainable region: depth × σ_w²",
            "Final test accuracy (mean over seeds, written in each cell) over the weight variance σ_w² read off "
            "the weights at init (fan_in × mean W², hidden layers 2..L; median per grid point) and the depth, "
            "per activation; grey: no run. Red: the mean-field trainable depth 6 ξ_c (Schoenholz et al. 2017) "
            "for the runs' median σ_b², infinite at the critical σ_w² (dotted): nets should train below it.",
            lambda: plots.plot_trainable_region(runs),
        )
    ]


def _start_importances(optuna_study):
    """An ``Importances`` being computed, or the ``NoFigure`` that says why there are none."""
    if optuna_study is None:
        return None
    try:
        return Importances(optuna_study)
    except NothingToWeigh as err:
        return plots.NoFigure(str(err))


def _importances(optuna_study, note: str, objective: str, started=None):
    """The importances figure; ``started``: what ``_start_importances`` gave (None: start them now)."""
    if optuna_study is None:
        raise plots.NoFigure(note)
    if started is None:
        started = _start_importances(optuna_study)
    if isinstance(started, plots.NoFigure):
        raise started
    try:
        found = started.result()
    except Exception as err:  # e.g. a resumed study whose space changed (dynamic distributions)
        why = str(err) if isinstance(err, EvaluatorError) else f"{type(err).__name__}: {err}"
        raise plots.NoFigure(f"Optuna could not compute the importances: {why}") from err
    return plots.plot_param_importances(found, objective)


def _history(optuna_study, note: str, objective: str):
    if optuna_study is None:
        raise plots.NoFigure(note)
    direction = optuna_study.directions[0].name.lower()
    return plots.plot_optimization_history(optuna_study.get_trials(deepcopy=False), objective, direction)


def _draw(spec: FigureSpec, out: Path) -> Drawn:
    try:
        fig = spec.draw()
    except plots.NoFigure as err:
        return Drawn(spec, None, str(err))
    except Exception as err:  # one broken figure must not cost the study its other figures
        log.exception("report figure %s failed", spec.name)
        return Drawn(spec, None, f"drawing this figure failed: {type(err).__name__}: {err}")
    path = out / f"{spec.name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Drawn(spec, path)


def _fresh_dir(path: Path) -> Path:
    """The report folder, emptied of a previous report's files (a figure may be skipped this time)."""
    path.mkdir(parents=True, exist_ok=True)
    for old in [*path.glob("*.png"), path / HTML_FILE]:
        old.unlink(missing_ok=True)
    return path


# ---- the HTML page --------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto; max-width: 1150px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; }
th { background: #f4f4f4; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.92em; max-width: 60em; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.5em 0.8em; }
.meta { color: #666; font-size: 0.9em; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


def _html(
    study: str,
    uri: str,
    parent: RunRecord,
    runs: list[plots.TrialRun],
    optuna_study,
    objective: str,
    drawn: list[Drawn],
) -> str:
    esc = html.escape
    sections: dict[str, list[Drawn]] = defaultdict(list)
    for item in drawn:
        sections[item.spec.section].append(item)
    body = [
        f"<h1>Study report: {esc(study)}</h1>",
        f"<p class='meta'>Generated {datetime.datetime.now().isoformat(timespec='seconds')} from {esc(uri)}, "
        f"parent run <code>{esc(parent.run_id)}</code>. Rebuild with "
        f"<code>python -m pipeline report {esc(study)} tracking.uri={esc(uri)}</code>.</p>",
        _overview(runs, objective),
        _toc(sections),
    ]
    for section, items in sections.items():
        body.append(f"<h2 id='{_anchor(section)}'>{esc(section)}</h2>")
        body.extend(_figure_html(item) for item in items)
    body.append(_summary_html(optuna_study, parent))
    body.append(_trials_table(runs))
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>Study report: {esc(study)}</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def _anchor(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower())


def _toc(sections: dict[str, list[Drawn]]) -> str:
    items = "".join(f"<li><a href='#{_anchor(s)}'>{html.escape(s)}</a></li>" for s in sections)
    return f"<ul>{items}<li><a href='#summary'>Summary tables</a></li><li><a href='#trials'>Trials</a></li></ul>"


def _overview(runs: list[plots.TrialRun], objective: str) -> str:
    outcomes = plots.trial_outcomes(runs)
    counts = {name: sum(o == name for o, _ in outcomes.values()) for name in (*plots.OUTCOMES, "running")}
    cells = "".join(f"<td>{counts[n]}</td>" for n in counts)
    heads = "".join(f"<th>{n}</th>" for n in counts)
    return (
        f"<p>{len(outcomes)} trials, {len(runs)} runs (one per trial and seed); objective <b>{html.escape(objective)}"
        f"</b>.</p><table><tr><th>trials</th>{heads}</tr><tr><td>{len(outcomes)}</td>{cells}</tr></table>"
    )


def _figure_html(item: Drawn) -> str:
    title, caption = html.escape(item.spec.title), html.escape(item.spec.caption)
    if item.path is None:
        return (
            f"<h3>{title}</h3><p class='note'>Figure skipped: {html.escape(item.note)}</p><p class='meta'>{caption}</p>"
        )
    data = base64.b64encode(item.path.read_bytes()).decode("ascii")
    return (
        f"<figure id='{item.spec.name}'><h3>{title}</h3><img alt='{title}' title='{title}' "
        f"src='data:image/png;base64,{data}'><figcaption>{caption} "
        f"(<code>{html.escape(item.path.name)}</code>)</figcaption></figure>"
    )


def _summary_html(optuna_study, parent: RunRecord) -> str:
    from pipeline.study.summary import study_summary

    head = "<h2 id='summary'>Summary tables</h2>"
    if optuna_study is None:
        return head + "<p class='note'>No Optuna study to summarize (see the notes above).</p>"
    objectives = (parent.params.get(names.OBJECTIVES_PARAM) or "val_accuracy").split(",")
    keys = [k for k in AXES if any(k in t.params for t in optuna_study.get_trials(deepcopy=False))]
    try:
        text = study_summary(optuna_study, objectives, keys)["text"]
    except Exception as err:  # the summary is a convenience here: never lose the page for it
        text = f"(summary unavailable: {type(err).__name__}: {err})"
    return head + f"<pre>{html.escape(text)}</pre>"


def _trials_table(runs: list[plots.TrialRun], limit: int = TABLE_ROWS) -> str:
    """A row per trial, the first ``limit`` trials by number (every trial is in the parent run's
    trials.csv: a page of 100,000 rows would be tens of megabytes)."""
    outcomes = plots.trial_outcomes(runs)
    by_trial: dict[int, list[plots.TrialRun]] = defaultdict(list)
    for run in runs:
        by_trial[run.trial].append(run)
    head = "".join(
        f"<th>{h}</th>"
        for h in ("trial", "outcome", *AXES, "seeds", "final test accuracy (mean ± std)", "failure reason")
    )
    numbers = sorted(by_trial)
    rows = [_trial_row(number, outcomes[number][0], by_trial[number]) for number in numbers[:limit]]
    cut = (
        f"<p class='note'>The first {limit:,} of {len(numbers):,} trials, by number; every trial is in "
        f"<code>{names.TRIALS_ARTIFACT}</code>, an artifact of the study's parent run.</p>"
        if len(numbers) > limit
        else ""
    )
    return f"<h2 id='trials'>Trials</h2>{cut}<table><tr>{head}</tr>{''.join(rows)}</table>"


def _trial_row(number: int, outcome: str, members: list[plots.TrialRun]) -> str:
    axes = members[0].axes
    finals = [r.final_accuracy for r in members if r.final_accuracy is not None and r.state == "COMPLETE"]
    accuracy = (
        f"{statistics.fmean(finals):.4f} ± {statistics.stdev(finals) if len(finals) > 1 else 0.0:.4f}"
        if finals
        else "–"
    )
    reason = next((r.reason for r in members if r.reason), "")
    cells = [number, outcome, *(plots.fmt(axes.get(k, "–")) for k in AXES), len(members), accuracy, reason[:200]]
    return "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>"
