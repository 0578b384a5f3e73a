"""A study's trial runs read, and whole trial runs written, in bulk, straight from and to a
database store's tables.

MLflow's ``search_runs`` builds a ``Run`` entity with every param, tag and latest metric of each
run: ~4 ms of CPU a run on sqlite (a trial run holds ~60 params, ~27 tags, ~18 metrics), 400 s for
a study of 100,000 runs. The report needs a dozen values a run, so on a database store (sqlite,
PostgreSQL, MySQL) it reads only those: one query per table (runs, tags, params, latest metrics)
for the whole experiment, and one per ``HISTORY_CHUNK`` runs for metric histories, whatever the
number of runs. The queries are SQLAlchemy Core over MLflow's own table models, which are MLflow's
private schema: the models and the columns read are named in ``PRIVATE_MLFLOW_TABLES`` and
``COLUMNS_READ`` (tests/test_private_apis.py fails loudly if an upgrade renames one). A server
store (``http://``) is read through the client instead (pipeline/record/readback.py).

Writing: MLflow's client spends ~30 ms of CPU on a tiny trial's run (create, one ``log_batch``,
end: seven transactions of ORM work), the largest share of a small trial's whole cost. A run
that a writer receives whole (opened and ended in one journal flush, pipeline/record/journal.py)
is inserted instead, with many others, in one transaction: the rows MLflow's ``create_run``,
``log_batch`` and ``set_terminated`` would leave (``COLUMNS_WRITTEN``; tests/record/test_whole_runs.py
compares the two, run by run).
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any, Optional

from pipeline.record.uris import resolve_uri

MODELS = "mlflow.store.tracking.dbmodels.models"
#: (module, attribute): MLflow's table models the bulk reads query.
PRIVATE_MLFLOW_TABLES = tuple(
    (MODELS, name) for name in ("SqlRun", "SqlTag", "SqlParam", "SqlLatestMetric", "SqlMetric")
)
#: The columns read, per model.
COLUMNS_READ = {
    "SqlRun": ("run_uuid", "name", "status", "artifact_uri", "experiment_id", "lifecycle_stage"),
    "SqlTag": ("run_uuid", "key", "value"),
    "SqlParam": ("run_uuid", "key", "value"),
    "SqlLatestMetric": ("run_uuid", "key", "value", "is_nan"),
    "SqlMetric": ("run_uuid", "key", "step", "value", "is_nan"),
}
#: The columns written, per model (``insert_runs``).
COLUMNS_WRITTEN = {
    "SqlRun": (
        "run_uuid",
        "name",
        "source_type",
        "source_name",
        "entry_point_name",
        "user_id",
        "status",
        "start_time",
        "end_time",
        "deleted_time",
        "source_version",
        "lifecycle_stage",
        "artifact_uri",
        "experiment_id",
    ),
    "SqlTag": ("run_uuid", "key", "value"),
    "SqlParam": ("run_uuid", "key", "value"),
    "SqlLatestMetric": ("run_uuid", "key", "value", "timestamp", "step", "is_nan"),
    "SqlMetric": ("run_uuid", "key", "value", "timestamp", "step", "is_nan"),
}
DATABASES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow's database stores
HISTORY_CHUNK = 500  # run ids per metric-history query (well under every database's bound-parameter limit)


def writable(uri: str) -> bool:
    """Whether whole runs may be inserted into ``uri``'s tables (``insert_runs``): the databases
    whose inserts are tested against MLflow's own writes (sqlite here, PostgreSQL in the team
    store's test); MySQL and SQL Server stay with MLflow's client."""
    return uri.split(":", 1)[0].split("+", 1)[0] in WRITTEN_DATABASES


WRITTEN_DATABASES = ("sqlite", "postgresql")


def readable(uri: str) -> bool:
    """Whether ``uri`` is a database store these reads can query (not a server, not a file store)."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0]
    return scheme in DATABASES


def experiment_runs(
    uri: str,
    experiment_id: str,
    params: Optional[Iterable[str]],
    tags: Optional[Iterable[str]],
    metrics: Optional[Iterable[str]],
) -> dict[str, dict[str, Any]]:
    """The active runs of an experiment: ``{run_id: {"name", "status", "artifact_uri", "params",
    "tags", "metrics"}}``, with only the named params, tags and latest metrics (None: all of them).
    Four queries, whatever the number of runs."""
    models = _models()
    run = models.SqlRun.__table__
    in_experiment = (run.c.experiment_id == int(experiment_id), run.c.lifecycle_stage == "active")
    with _engine(resolve_uri(uri)).connect() as connection:
        query = _select(run.c.run_uuid, run.c.name, run.c.status, run.c.artifact_uri).where(*in_experiment)
        runs = {
            r[0]: {"name": r[1] or "", "status": r[2], "artifact_uri": r[3], "params": {}, "tags": {}, "metrics": {}}
            for r in _rows(connection, query)
        }
        for field, model, keys in (
            ("params", models.SqlParam, params),
            ("tags", models.SqlTag, tags),
            ("metrics", models.SqlLatestMetric, metrics),
        ):
            _read_entities(connection, run, in_experiment, model.__table__, keys, runs, field)
    return runs


def _read_entities(connection, run, in_experiment, table, keys, runs: dict, field: str) -> None:
    """One query: ``table``'s rows of the experiment's runs with a wanted key, into ``runs[id][field]``."""
    columns = [table.c.run_uuid, table.c.key, table.c.value] + ([table.c.is_nan] if field == "metrics" else [])
    query = _select(*columns).join(run, run.c.run_uuid == table.c.run_uuid).where(*in_experiment)
    if keys is not None:
        query = query.where(table.c.key.in_(list(keys)))  # the tables' primary key leads with the key
    names: dict[str, str] = {}  # one string per key name, not one per row (100,000s of runs)
    for row in _rows(connection, query):
        held = runs.get(row[0])
        if held is not None:
            value = (math.nan if row[3] else float(row[2])) if field == "metrics" else row[2]
            held[field][names.setdefault(row[1], row[1])] = value


def metric_histories(uri: str, run_ids: Sequence[str], keys: Iterable[str]) -> dict[str, dict[str, list]]:
    """``{run_id: {key: [(step, value), ...]}}`` sorted by step, for each of ``keys`` the runs
    logged: one query per ``HISTORY_CHUNK`` runs."""
    table = _models().SqlMetric.__table__
    keys = list(keys)
    found: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    with _engine(resolve_uri(uri)).connect() as connection:
        for start in range(0, len(run_ids), HISTORY_CHUNK):
            chunk = list(run_ids[start : start + HISTORY_CHUNK])
            query = _select(table.c.run_uuid, table.c.key, table.c.step, table.c.value, table.c.is_nan).where(
                table.c.run_uuid.in_(chunk), table.c.key.in_(keys)
            )
            for run_id, key, step, value, is_nan in _rows(connection, query):
                found[run_id][key].append((step, math.nan if is_nan else float(value)))
    return {run_id: {key: sorted(points) for key, points in curves.items()} for run_id, curves in found.items()}


def _rows(connection, query) -> list[tuple]:
    """Every row of ``query`` as a plain tuple, through the database driver's own cursor:
    SQLAlchemy's row objects cost microseconds a row, seconds over the 10^6 rows of a large study.
    The query's values are written into its text (numbers, and run ids and key names quoted by
    SQLAlchemy for this database), so no driver-specific parameter style is needed."""
    text = str(query.compile(dialect=connection.dialect, compile_kwargs={"literal_binds": True}))
    cursor = connection.connection.cursor()
    try:
        cursor.execute(text)
        return cursor.fetchall()
    finally:
        cursor.close()


def _select(*columns):
    import sqlalchemy

    return sqlalchemy.select(*columns)


def _models():
    import importlib

    return importlib.import_module(MODELS)


@functools.lru_cache(maxsize=8)
def _engine(resolved_uri: str):
    """A SQLAlchemy engine on the store's database (no pool: a report opens it a few times)."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    return sqlalchemy.create_engine(resolved_uri, poolclass=NullPool)


def insert_runs(uri: str, runs: Sequence[dict[str, Any]]) -> None:
    """Whole runs in one transaction. Each: ``{"run": {SqlRun column: value}, "tags": {key: value},
    "params": {key: value}, "metrics": [(key, value, timestamp_ms, step), ...]}``; metrics are
    stored as MLflow stores them (NaN as 0 with ``is_nan``, infinities clamped, exact repeats
    dropped), each key's latest by (step, timestamp, value) in ``latest_metrics``."""
    models = _models()
    rows: dict[Any, list[dict]] = defaultdict(list)
    for run in runs:
        run_id = run["run"]["run_uuid"]
        rows[models.SqlRun].append(run["run"])
        rows[models.SqlTag] += [{"run_uuid": run_id, "key": k, "value": v} for k, v in run["tags"].items()]
        rows[models.SqlParam] += [{"run_uuid": run_id, "key": k, "value": v} for k, v in run["params"].items()]
        metrics = _metric_rows(run_id, run["metrics"])
        rows[models.SqlMetric] += metrics
        rows[models.SqlLatestMetric] += _latest(metrics)
    with _write_engine(resolve_uri(uri)).begin() as connection:
        for model in (models.SqlRun, models.SqlTag, models.SqlParam, models.SqlMetric, models.SqlLatestMetric):
            if rows[model]:
                connection.execute(model.__table__.insert(), rows[model])


def _metric_rows(run_id: str, metrics: Iterable[tuple]) -> list[dict]:
    unique = {}
    for key, value, timestamp, step in metrics:
        is_nan = math.isnan(value)
        stored = 0.0 if is_nan else max(-_FLOAT_MAX, min(_FLOAT_MAX, value))
        row = {"run_uuid": run_id, "key": key, "value": stored, "timestamp": timestamp, "step": step, "is_nan": is_nan}
        unique.setdefault((key, stored, timestamp, step, is_nan), row)
    return list(unique.values())


_FLOAT_MAX = 1.7976931348623157e308  # SQL has no infinities: MLflow stores them as the largest double


def _latest(metric_rows: list[dict]) -> list[dict]:
    latest: dict[str, dict] = {}
    for row in metric_rows:
        held = latest.get(row["key"])
        if held is None or _recency(row) > _recency(held):
            latest[row["key"]] = row
    return list(latest.values())


def _recency(row: dict) -> tuple:
    return row["step"], row["timestamp"], row["value"]  # MLflow's order for a key's latest value


@functools.lru_cache(maxsize=8)
def _write_engine(resolved_uri: str):
    """A pooled engine for a writer's many transactions; on sqlite, one that waits for the other
    writers' transactions (the file has one writer at a time) instead of failing after 5 s."""
    import sqlalchemy

    connect_args = {"timeout": 120} if resolved_uri.startswith("sqlite") else {}
    return sqlalchemy.create_engine(resolved_uri, connect_args=connect_args)
