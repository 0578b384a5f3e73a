"""The MLflow store: clients, a new sqlite store made fast, experiments.

Every MLflow client of ours comes from ``client``. MLflow's private APIs that we use for speed are
named in ``PRIVATE_MLFLOW_APIS`` (tests/test_private_apis.py fails loudly if an upgrade
removes one); without them a store is still made, by MLflow itself, only slower.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from pipeline.config import TrackingConfig, user_cache_dir
from pipeline.record import names
from pipeline.record.uris import is_server, local_store, resolve_uri

# MLflow 3 sends usage telemetry by default; a study's processes must not phone out (and it costs time).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

#: (module, attribute): MLflow's private helpers that ``_store_template`` uses to build an empty
#: store at MLflow's own latest schema once, instead of replaying every migration per store (~2 s).
PRIVATE_MLFLOW_APIS = (
    ("mlflow.store.db.utils", "_get_latest_schema_revision"),
    ("mlflow.store.db.utils", "_initialize_tables"),
)


def client(uri: str):
    """The ``MlflowClient`` of the store at ``uri`` (a new sqlite store is made first)."""
    uri = resolve_uri(uri)
    _seed_store(uri)
    return _client(uri)


@functools.lru_cache(maxsize=64)
def _client(resolved_uri: str):
    """One client per store and process (a study's driver opens a handle per run, ~1 ms each),
    made once the store answers (``_wait_for_store``)."""
    from mlflow.tracking import MlflowClient

    quiet_logs()
    return _wait_for_store(lambda: MlflowClient(tracking_uri=resolved_uri), resolved_uri)


def quiet_logs() -> None:
    # No table-creation chatter per process: stderr stays for our one-line errors.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def new_store(uri: str, write_ahead: bool = True) -> None:
    """Make the sqlite store of ``uri`` now if it does not exist (no-op for a server), in
    write-ahead-log mode or, for a store that processes on several hosts may share over a network
    filesystem (where SQLite's write-ahead log does not work), in its default journal mode."""
    _seed_store(resolve_uri(uri), write_ahead)


def open_store(uri: str, write_ahead: bool = True) -> None:
    """``new_store``, then this process's client to it (a study opens the store while Ray
    starts, so its first run finds it ready)."""
    new_store(uri, write_ahead)
    client(uri)


#: How long a fresh sqlite store may take another process (an ``mlflow ui`` started at the same
#: moment) to finish building before this one gives up on it.
STORE_BUILD_WAIT_S = 30.0


def _wait_for_store(make_client, resolved_uri: str):
    """A client whose first query answered, waiting while another process builds a fresh sqlite store.

    MLflow builds a new sqlite store by replaying its migrations; a second process that opens the
    file meanwhile sees a half-built schema and fails (``No such constraint``, missing columns).
    Such a store is complete a few seconds later, so retry until then; any other store fails at once.
    """
    deadline = time.monotonic() + STORE_BUILD_WAIT_S
    while True:
        try:
            mlflow_client = make_client()  # the store is opened (and a new one built) here
            mlflow_client.search_experiments(max_results=1)
            return mlflow_client
        except Exception:
            if local_store(resolved_uri) is None or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _seed_store(uri: str, write_ahead: bool = True) -> None:
    """A new sqlite store starts as a copy of an empty one that MLflow built at the same schema revision.

    MLflow makes a fresh sqlite store by creating its first schema and replaying every alembic
    migration since (~2 s, before a study's first record). The copy holds the same tables at the
    same revision (MLflow's own ``_initialize_tables`` built it, and MLflow verifies the revision
    when it opens the store) and no rows: MLflow adds the Default experiment, with this
    process's artifact root, as it does for any new store.

    The copy is in SQLite's write-ahead-log mode (kept in the file; unless ``write_ahead`` is
    false): a commit costs one write instead of a journal's several (a trial's run makes ~8), and
    readers (the MLflow UI) do not block the workers' writes.
    """
    path = local_store(uri)
    if path is None or path.exists():
        return
    template = _store_template()
    if template is None:
        return  # MLflow creates the store itself
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        shutil.copyfile(template, partial)
        if write_ahead:
            _write_ahead_log(partial)
        os.link(partial, path)  # never replaces a store that another process created meanwhile
    except OSError:
        pass  # it exists now, or no hard links here: MLflow opens or creates it as usual
    finally:
        partial.unlink(missing_ok=True)


def _write_ahead_log(path: Path) -> None:
    import sqlite3

    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.execute("PRAGMA journal_mode=WAL")


@functools.lru_cache(maxsize=1)
def _store_template() -> Optional[Path]:
    """An empty sqlite store at MLflow's latest schema, cached per schema revision (None if it cannot be made)."""
    try:
        from mlflow.store.db import utils as db_utils

        cache = user_cache_dir()
        template = cache / f"mlflow-schema-{db_utils._get_latest_schema_revision()}.db"
    except Exception:  # an MLflow without these helpers
        return None
    if template.exists():
        return template
    partial = cache / f".{template.name}.{os.getpid()}.partial"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        engine = db_utils.create_sqlalchemy_engine(f"sqlite:///{partial}")
        db_utils._initialize_tables(engine)
        engine.dispose()
        os.replace(partial, template)
        return template
    except Exception:  # a read-only home: no template
        partial.unlink(missing_ok=True)
        return None


def ensure_experiment(tracking: TrackingConfig, name: str) -> str:
    """The id of experiment ``name``, created (with a local artifact root for sqlite stores) if new.

    Remembered per process: a study's driver opens a run per trial (the lookup cost ~4 ms each)."""
    key = (tracking.uri, name)
    if key not in _experiment_ids:
        _experiment_ids[key] = _find_or_create_experiment(tracking, name)
    return _experiment_ids[key]


_experiment_ids: dict[tuple[str, str], str] = {}


def _find_or_create_experiment(tracking: TrackingConfig, name: str) -> str:
    mlflow_client = client(tracking.uri)
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        if found.tags.get(names.EXPERIMENT_KIND_TAG) != names.MODEL_TRAINING_KIND:  # made before the tag was set
            mlflow_client.set_experiment_tag(found.experiment_id, names.EXPERIMENT_KIND_TAG, names.MODEL_TRAINING_KIND)
        return found.experiment_id
    location = None if is_server(tracking.uri) else Path(tracking.artifact_root).resolve().as_uri()
    kind = {names.EXPERIMENT_KIND_TAG: names.MODEL_TRAINING_KIND}
    try:
        return mlflow_client.create_experiment(name, artifact_location=location, tags=kind)
    except Exception:  # another process created it meanwhile
        return mlflow_client.get_experiment_by_name(name).experiment_id


def run_artifact_uri(uri: str, experiment_id: str, run_id: str) -> str:
    """Where MLflow puts a new run's artifacts: ``<experiment's artifact location>/<run id>/artifacts``."""
    from mlflow.utils.uri import append_to_uri_path

    return append_to_uri_path(_artifact_location(resolve_uri(uri), experiment_id), run_id, "artifacts")


@functools.lru_cache(maxsize=64)
def _artifact_location(resolved_uri: str, experiment_id: str) -> str:
    return _client(resolved_uri).get_experiment(experiment_id).artifact_location


def experiment_of(uri: str, run_id: str) -> str:
    """The name of the experiment a run belongs to."""
    mlflow_client = client(uri)
    return mlflow_client.get_experiment(mlflow_client.get_run(run_id).info.experiment_id).name


#: MLflow 3's UI opens an experiment in its GenAI view (traces) unless the address asks for the
#: model-training one, whatever the experiment's kind tag says (tests/test_mlflow_ui.py).
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def ui_address(uri: str, run_id: str, experiment_page: bool = False) -> str:
    """Where a run (or, with ``experiment_page``, its experiment's run table) is in the MLflow UI,
    in the model-training view; for a sqlite store, the command that serves it first."""
    experiment_id = client(uri).get_run(run_id).info.experiment_id
    page = f"#/experiments/{experiment_id}" + ("" if experiment_page else f"/runs/{run_id}")
    page += f"?{MODEL_TRAINING_VIEW}"
    if is_server(uri):
        return f"{resolve_uri(uri).rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {resolve_uri(uri)}, then http://127.0.0.1:5000/{page}"
