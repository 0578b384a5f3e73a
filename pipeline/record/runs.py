"""MLflow runs: open, write (buffered), always end, find.

Runs are always ended: a ``Run`` is a context manager that marks it FAILED (with the reason) if
the body raises, and KILLED on Ctrl-C, so no run is left RUNNING.
"""

from __future__ import annotations

import socket
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse
from urllib.request import url2pathname

from pipeline.config import ConfigError, TrackingConfig
from pipeline.record import names, tables
from pipeline.record.provenance import provenance, reproduce_command
from pipeline.record.store import client, ensure_experiment, run_artifact_uri
from pipeline.record.uris import local_store, resolve_uri

PARAM_BATCH = 100  # MLflow's limit of params (and of tags) per log_batch call
METRIC_BATCH = 1000  # MLflow's limit of metrics, and of all entities, per log_batch call
FLUSH_EVERY_S = 2.0  # curves reach the store at least this often while a trial runs
MAX_SEARCH_RESULTS = 5000
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param's value
MAX_REASON_CHARS = 5000
RUN_NAME_TAG = "mlflow.runName"  # MLflow's own: the name its UI shows


class EndsOnExit:
    """A run (or a look-alike with ``end``) that, as a context manager, is always ended: FINISHED,
    KILLED on Ctrl-C, FAILED with the exception as its reason."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.end("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.end("KILLED", reason="interrupted")
        else:
            self.end("FAILED", reason=f"{exc_type.__name__}: {exc}")
        return False


class Run(EndsOnExit):
    """A handle on one MLflow run. As a context manager it always ends the run."""

    def __init__(self, uri: str, run_id: str, artifact_uri: Optional[str] = None) -> None:
        self.client = client(uri)
        self.uri, self.run_id = uri, run_id
        self.artifact_uri = artifact_uri  # known when this process created the run
        self.ended = False
        self._pending: list = []  # buffered metrics
        self._pending_params: list = []
        self._pending_tags: list = []
        self._flushed_at = time.monotonic()
        self.flush_every_s = FLUSH_EVERY_S  # runs trained together share the store's write rate

    def log_params(self, params: dict[str, str], tags: Optional[dict[str, Any]] = None, buffered: bool = False) -> None:
        """Params (and ``tags``), now or (``buffered``) in the next metric write."""
        from mlflow.entities import Param, RunTag

        self._pending_params += [Param(k, v[:MAX_PARAM_CHARS]) for k, v in params.items()]
        self._pending_tags += [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        if not buffered:
            self.flush()

    def log_metrics(
        self, step: int, metrics: dict[str, float], buffered: bool = False, timestamp_ms: Optional[int] = None
    ) -> None:
        """Log now, or (``buffered``) at most every FLUSH_EVERY_S: one store write per few epochs.

        Short trials log many epochs per second; a write per epoch would cost more than training.
        ``timestamp_ms``: when the values were measured, if not now (a worker's journal).
        """
        from mlflow.entities import Metric

        now = timestamp_ms or int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if not buffered or time.monotonic() - self._flushed_at >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        """Everything buffered, in as few ``log_batch`` calls as MLflow's limits allow (each is a
        store transaction: ~10 ms on sqlite, whatever its size)."""
        params, metrics, tags = self._pending_params, self._pending, self._pending_tags
        while params or metrics or tags:
            batch_params, params = params[:PARAM_BATCH], params[PARAM_BATCH:]
            batch_tags, tags = tags[:PARAM_BATCH], tags[PARAM_BATCH:]
            room = METRIC_BATCH - len(batch_params) - len(batch_tags)  # the limit counts every entity of a call
            batch_metrics, metrics = metrics[:room], metrics[room:]
            self.client.log_batch(self.run_id, metrics=batch_metrics, params=batch_params, tags=batch_tags)
        self._pending, self._pending_params, self._pending_tags, self._flushed_at = [], [], [], time.monotonic()

    def set_tags(self, tags: dict[str, Any], buffered: bool = False) -> None:
        """Set now, or (``buffered``) with the next metric write."""
        from mlflow.entities import RunTag

        self._pending_tags += [RunTag(k, str(v)) for k, v in tags.items()]
        if not buffered:
            self.flush()

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dir(self, local_dir: Path, artifact_dir: Optional[str] = None) -> None:
        """Every file of ``local_dir`` under the run's artifact directory ``artifact_dir``."""
        if self.artifact_uri is None:
            self.client.log_artifacts(self.run_id, str(local_dir), artifact_dir)
            return
        # The repository straight from the run's artifact URI: MlflowClient would first read the
        # run back from the store to learn it (a query per trial in a study's driver).
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        repository = get_artifact_repository(self.artifact_uri, tracking_uri=resolve_uri(self.uri))
        repository.log_artifacts(str(local_dir), artifact_dir)

    def log_files(self, files: dict[str, bytes], artifact_dir: Optional[str] = None) -> None:
        """Files given as ``{relative path: content}`` (a worker's journal), in one upload; where the
        run's artifacts live in a local directory, written there at once (no temporary copy)."""
        local = local_directory(self.artifact_uri)
        if local is not None:
            _write_files(local / (artifact_dir or ""), files)
            return
        with tempfile.TemporaryDirectory() as tmp:
            _write_files(Path(tmp), files)
            self.log_dir(Path(tmp), artifact_dir)

    def end(self, status: str, reason: Optional[str] = None, end_ms: Optional[int] = None) -> None:
        if self.ended:
            return
        if reason:
            self.set_tags({names.FAILURE_REASON_TAG: reason[:MAX_REASON_CHARS]}, buffered=True)
        self.flush()
        self.client.set_terminated(self.run_id, status=status, end_time=end_ms)
        self.ended = True


def _write_files(root: Path, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def local_directory(artifact_uri: Optional[str]) -> Optional[Path]:
    """The directory of a ``file:`` (or plain path) artifact URI; None for a server's or a cloud's."""
    if artifact_uri is None:
        return None
    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(url2pathname(parsed.path))
    return Path(artifact_uri) if parsed.scheme == "" else None


def start_run(
    tracking: TrackingConfig,
    experiment: str,
    parent_run_id: Optional[str] = None,
    run_name: Optional[str] = None,
    tags: Optional[dict] = None,
    reproducible: bool = False,
    start_ms: Optional[int] = None,
) -> Run:
    """A new run in ``experiment`` (created if new), tagged with provenance (and its parent).

    ``reproducible``: a trial's run, tagged with the command that re-runs it. ``start_ms``: when
    it started, if not now (a worker's journal, written by the driver).
    """
    if parent_run_id:
        _check_parent_store(tracking.uri)
    experiment_id = ensure_experiment(tracking, experiment)
    all_tags = _opening_tags(tags, parent_run_id)
    run = client(tracking.uri).create_run(experiment_id, start_time=start_ms, run_name=run_name, tags=all_tags)
    handle = Run(tracking.uri, run.info.run_id, run.info.artifact_uri)
    if reproducible:  # with the run's first write
        handle.set_tags({names.REPRODUCE_TAG: reproduce_command(handle.run_id)}, buffered=True)
    return handle


def _opening_tags(tags: Optional[dict], parent_run_id: Optional[str]) -> dict[str, str]:
    opening = {**provenance(), **{k: str(v) for k, v in (tags or {}).items()}}
    if parent_run_id:
        opening[names.PARENT_RUN_TAG] = parent_run_id
    return opening


@dataclass
class WholeRun:
    """A run known whole before it is written: what ``start_run``, the buffered writes and ``end``
    would give MLflow, for ``write_whole_runs``."""

    experiment: str
    run_name: str
    parent_run_id: Optional[str]
    opening_tags: dict[str, str]
    reproducible: bool
    start_ms: int
    status: str = "FINISHED"
    end_ms: Optional[int] = None
    reason: Optional[str] = None
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)  # set after the opening ones, in order
    metrics: list[tuple[str, float, int, int]] = field(default_factory=list)  # (key, value, ms, step)
    files: list[tuple[Optional[str], dict[str, bytes]]] = field(default_factory=list)  # (artifact dir, files)


def write_whole_runs(tracking: TrackingConfig, whole: list[WholeRun]) -> list[Run]:
    """Ended runs, written to a database store in one transaction (pipeline/record/tables.py):
    the same record as ``start_run`` and its run's writes, ~10x cheaper. Their handles, ended."""
    handles, records = [], []
    for run in whole:
        handle, record = _whole_run_record(tracking, run)
        for artifact_dir, files in run.files:
            handle.log_files(files, artifact_dir)
        handles.append(handle)
        records.append(record)
    tables.insert_runs(tracking.uri, records)
    return handles


def _whole_run_record(tracking: TrackingConfig, run: WholeRun) -> tuple[Run, dict]:
    if run.parent_run_id:
        _check_parent_store(tracking.uri)
    experiment_id = ensure_experiment(tracking, run.experiment)
    run_id = uuid.uuid4().hex
    handle = Run(tracking.uri, run_id, run_artifact_uri(tracking.uri, experiment_id, run_id))
    handle.ended = True
    tags = _opening_tags(run.opening_tags, run.parent_run_id)
    tags.setdefault(RUN_NAME_TAG, run.run_name)
    if run.reproducible:
        tags[names.REPRODUCE_TAG] = reproduce_command(run_id)
    tags.update(run.tags)
    if run.reason:
        tags[names.FAILURE_REASON_TAG] = run.reason[:MAX_REASON_CHARS]
    columns = {
        "run_uuid": run_id, "name": run.run_name, "source_type": "UNKNOWN", "source_name": "",
        "entry_point_name": "", "user_id": tags.get("mlflow.user", "unknown"), "status": run.status,
        "start_time": run.start_ms, "end_time": run.end_ms or int(time.time() * 1000), "deleted_time": None,
        "source_version": "", "lifecycle_stage": "active", "artifact_uri": handle.artifact_uri,
        "experiment_id": int(experiment_id),
    }  # fmt: skip
    params = {k: v[:MAX_PARAM_CHARS] for k, v in run.params.items()}
    return handle, {"run": columns, "tags": tags, "params": params, "metrics": run.metrics}


def _check_parent_store(uri: str) -> None:
    """A child run's sqlite store must already exist here: the driver created it with the parent.

    A Ray node on another host would otherwise create a fresh, empty file at the same path and
    record its trials where the study never looks.
    """
    path = local_store(uri)
    if path is not None and not path.exists():
        raise ConfigError(
            f"tracking.uri={uri}: no such file on host {socket.gethostname()}, so this Ray node cannot see the "
            "study's record (a sqlite store works only where every node shares the driver's filesystem); "
            "run an MLflow server (scripts/mlflow_server.sh) and set tracking.uri=http://HOST:PORT (docs/cluster.md)"
        )


def reopen_run(uri: str, run_id: str) -> Run:
    """An existing run set RUNNING again (a resumed study's parent run)."""
    handle = Run(uri, run_id)
    handle.client.update_run(run_id, status="RUNNING")
    return handle


def tag_run(uri: str, run_id: str, tags: dict[str, Any]) -> None:
    """Set tags on an existing run, whatever its status."""
    Run(uri, run_id).set_tags(tags)


def filter_string(tags: dict[str, Any], status: Optional[str] = None) -> str:
    """MLflow's search filter for runs whose ``tags`` equal these values (and whose status is ``status``)."""
    clauses = [f"tags.`{key}` = {_quoted(value)}" for key, value in tags.items()]
    if status:
        clauses.append(f"attributes.status = {_quoted(status)}")
    return " and ".join(clauses)


def _quoted(value: Any) -> str:
    """A filter string literal: MLflow's grammar has no escapes, so a value with a ``'`` is quoted with ``"``."""
    text = str(value)
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    raise ConfigError(f"{text!r} holds both kinds of quote, which MLflow's search cannot match")


def find_runs(
    tracking: TrackingConfig, experiment: str, tags: dict[str, Any], status: Optional[str] = None
) -> list[str]:
    """Ids of the runs in ``experiment`` whose tags equal ``tags`` (and whose status is ``status``)."""
    found = client(tracking.uri).get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client(tracking.uri).search_runs(
        [found.experiment_id], filter_string(tags, status), max_results=MAX_SEARCH_RESULTS
    )
    return [r.info.run_id for r in runs]


def runs_with_tag(
    tracking: TrackingConfig, experiment: str, key: str, values: set[str], since_ms: int
) -> list[tuple[str, str, str]]:
    """(id, value, status) of the runs in ``experiment`` whose tag ``key`` is one of ``values``.

    MLflow's search takes one value a query, each a scan of the whole experiment (~1 s at 10^4
    runs): a database store is read in bulk instead (that one tag of every run,
    pipeline/record/tables.py); a server is searched once, from ``since_ms`` on, every page.
    """
    found = client(tracking.uri).get_experiment_by_name(experiment)
    if found is None or not values:
        return []
    if tables.readable(tracking.uri):
        runs = tables.experiment_runs(tracking.uri, found.experiment_id, params=[], tags=[key], metrics=[])
        return [
            (run_id, run["tags"][key], run["status"]) for run_id, run in runs.items() if run["tags"].get(key) in values
        ]
    query = f"attributes.start_time >= {int(since_ms)}"
    ids, token = [], None
    while True:
        page = client(tracking.uri).search_runs(
            [found.experiment_id], query, max_results=MAX_SEARCH_RESULTS, page_token=token
        )
        ids += [(r.info.run_id, r.data.tags[key], r.info.status) for r in page if r.data.tags.get(key) in values]
        token = page.token
        if not token:
            return ids
