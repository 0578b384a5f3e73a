"""Reading recorded studies and runs back, as plain data (the report, reproduce).

A study's trial runs are read in bulk: on a database store straight from its tables, only the
params, tags and metrics asked for (pipeline/record/tables.py: a few queries whatever the number of
runs); on a server through ``search_runs`` pages. Curves come in bulk too (``many_histories``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Optional

from pipeline.config import ConfigError
from pipeline.record import names, tables
from pipeline.record.runs import MAX_SEARCH_RESULTS, filter_string
from pipeline.record.store import client
from pipeline.record.uris import check_store_exists, resolve_uri


@dataclass
class RunRecord:
    """One run as plain data: what the report needs, no MLflow objects."""

    run_id: str
    name: str
    status: str
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]  # the latest value of each metric
    artifact_uri: Optional[str] = None
    experiment_id: str = ""


@dataclass(frozen=True)
class Wanted:
    """What a bulk read keeps of each run: these params, tags and latest metrics."""

    params: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()


def _record(run) -> RunRecord:
    return RunRecord(
        run.info.run_id,
        run.info.run_name or "",
        run.info.status,
        dict(run.data.params),
        dict(run.data.tags),
        dict(run.data.metrics),
        run.info.artifact_uri,
        run.info.experiment_id,
    )


def study_names(uri: str) -> list[str]:
    """Names of the experiments that hold a study (a run tagged ``initstudy.role=study``)."""
    mlflow_client = client(uri)
    experiments, token = {}, None
    while True:  # every page of experiments
        page = mlflow_client.search_experiments(max_results=1000, page_token=token)
        experiments.update({e.experiment_id: e.name for e in page})
        token = page.token
        if not token:
            break
    if not experiments:
        return []
    runs = _search_all(mlflow_client, list(experiments), filter_string({names.ROLE_TAG: names.STUDY_ROLE}))
    return sorted({experiments[r.info.experiment_id] for r in runs})


def study_runs(uri: str, study: str) -> tuple[RunRecord, list[RunRecord]]:
    """The parent run of ``study`` and its trial runs (one per trial and seed), whole.

    Raises:
        ConfigError: the store does not exist, or holds no study of that name (the message lists
            the studies it does hold).
    """
    parent = study_parent(uri, study)
    return parent, trial_runs(uri, parent)


def study_parent(uri: str, study: str) -> RunRecord:
    """The parent run of ``study``.

    Raises:
        ConfigError: the store does not exist, or holds no study of that name (the message lists
            the studies it does hold).
    """
    check_store_exists(uri)
    mlflow_client = client(uri)
    found = mlflow_client.get_experiment_by_name(study)
    parents = (
        _search_all(mlflow_client, [found.experiment_id], filter_string({names.ROLE_TAG: names.STUDY_ROLE}))
        if found
        else []
    )
    if not parents:
        held = study_names(uri)
        listing = f"studies here: {', '.join(held)}" if held else "no study is recorded there yet"
        raise ConfigError(f"unknown study '{study}' in {resolve_uri(uri)}; {listing}")
    return _record(parents[0])


def trial_runs(uri: str, parent: RunRecord, wanted: Optional[Wanted] = None) -> list[RunRecord]:
    """The trial runs of the study whose parent run is ``parent``: whole, or (``wanted``) only the
    params, tags and metrics named there, read in bulk (the same records on every kind of store)."""
    if wanted is not None and tables.readable(uri):
        found = tables.experiment_runs(
            uri,
            parent.experiment_id,
            params=wanted.params,
            tags=(*wanted.tags, names.ROLE_TAG),
            metrics=wanted.metrics,
        )
        trials = [(i, r) for i, r in found.items() if r["tags"].pop(names.ROLE_TAG, None) == names.TRIAL_ROLE]
        return [
            RunRecord(
                i, r["name"], r["status"], r["params"], r["tags"], r["metrics"], r["artifact_uri"], parent.experiment_id
            )
            for i, r in trials
        ]
    query = filter_string({names.ROLE_TAG: names.TRIAL_ROLE})
    runs = [_record(r) for r in _search_all(client(uri), [parent.experiment_id], query)]
    return runs if wanted is None else [_keep(r, wanted) for r in runs]


def _keep(record: RunRecord, wanted: Wanted) -> RunRecord:
    record.params = {k: v for k, v in record.params.items() if k in wanted.params}
    record.tags = {k: v for k, v in record.tags.items() if k in wanted.tags}
    record.metrics = {k: v for k, v in record.metrics.items() if k in wanted.metrics}
    return record


def _search_all(mlflow_client, experiment_ids: list[str], filter_text: str) -> list:
    runs, token = [], None
    while True:
        page = mlflow_client.search_runs(experiment_ids, filter_text, max_results=MAX_SEARCH_RESULTS, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def metric_histories(uri: str, run_id: str, keys: Iterable[str]) -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value), ...]}`` sorted by step, for each of ``keys`` the run has logged."""
    mlflow_client = client(uri)
    histories = {}
    for key in keys:
        points = mlflow_client.get_metric_history(run_id, key)
        if points:
            histories[key] = sorted((m.step, m.value) for m in points)
    return histories


def many_histories(
    uri: str, run_ids: Sequence[str], keys: Iterable[str]
) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{run_id: {key: [(step, value), ...]}}`` for many runs: a query per 500 runs on a database
    store; on a server a call per run and key (callers bound ``run_ids``: the report's sample)."""
    keys = list(keys)
    if tables.readable(uri):
        return tables.metric_histories(uri, run_ids, keys)
    return {run_id: metric_histories(uri, run_id, keys) for run_id in run_ids}


def batch_mates(uri: str, run_id: str) -> list[str]:
    """The runs that trained in one batch with ``run_id``, in the batch's order and itself
    included; ``[run_id]`` for a run that trained alone."""
    mlflow_client = client(uri)
    run = mlflow_client.get_run(run_id)
    batch_id = run.data.tags.get(names.BATCH_ID_TAG)
    if batch_id is None:
        return [run_id]
    query = filter_string({names.BATCH_ID_TAG: batch_id})
    mates = mlflow_client.search_runs([run.info.experiment_id], query, max_results=MAX_SEARCH_RESULTS)
    return [r.info.run_id for r in sorted(mates, key=lambda r: int(r.data.tags[names.BATCH_INDEX_TAG]))]
