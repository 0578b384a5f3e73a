"""Everything MLflow: the only module that imports it (its API moves between releases).

The record of a trial (shared/DESIGN.md section 2): a run whose params are the five axes plus the
flattened config; metrics ``train_loss``, ``train_accuracy``, ``val_loss``, ``val_accuracy`` and
diagnostic summaries with ``step=epoch`` (epoch 0 is the initialization); at the end
``final_accuracy`` and friends; tags ``diverged``, provenance (git commit, package versions,
device, host) and the command that reproduces it; artifacts: the resolved config, the final
weights, the per-layer diagnostics table and its plot.

Runs are always ended: ``TrialRecorder`` is a context manager that marks a run FAILED (with the
reason) if the body raises, and KILLED on Ctrl-C, so no run is left RUNNING.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import importlib.metadata
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional
from urllib.parse import urlparse
from urllib.request import url2pathname

import yaml

from pipeline.compose_cache import user_cache_dir
from pipeline.config import AXES, TrackingConfig
from pipeline.errors import ConfigError

PARAM_BATCH = 100  # MLflow's limit of params (and of tags) per log_batch call
METRIC_BATCH = 1000  # MLflow's limit of metrics, and of all entities, per log_batch call
FLUSH_EVERY_S = 2.0  # curves reach the store at least this often while a trial runs

# MLflow 3 sends usage telemetry by default; a study's workers must not phone out (and it costs time).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
WEIGHTS_ARTIFACT = "weights/model.safetensors"
CONFIG_ARTIFACT = "config.yaml"


def resolve_uri(uri: str) -> str:
    """Make a relative sqlite path absolute (and its directory exist), so workers agree on it."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///"):]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return uri


def for_workers(tracking_section: dict) -> dict:
    """A config's ``tracking`` section as it travels to workers: the driver's absolute store path,
    not one each worker would resolve against its own working directory."""
    return {**tracking_section, "uri": resolve_uri(tracking_section["uri"])}


def local_store(uri: str) -> Optional[Path]:
    """The file of a sqlite tracking store (None for a server): only its own host can write to it."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):]).resolve()


def client(uri: str):
    uri = resolve_uri(uri)
    _seed_store(uri)
    return _client(uri)


@functools.lru_cache(maxsize=64)
def _client(resolved_uri: str):
    """One client per store and process: a study's driver opens a handle per run (~1 ms each)."""
    from mlflow.tracking import MlflowClient

    _quiet_logs()
    return MlflowClient(tracking_uri=resolved_uri)


def new_store(uri: str, write_ahead: bool = True) -> None:
    """Make the sqlite store of ``uri`` now if it does not exist (no-op for a server), in
    write-ahead-log mode or, for a store that processes on several hosts may share over a network
    filesystem (where SQLite's write-ahead log does not work), in its default journal mode."""
    _seed_store(resolve_uri(uri), write_ahead)


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


def _quiet_logs() -> None:
    # No table-creation chatter per process: stderr stays for our one-line errors.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail at once, with a clear message, if an HTTP tracking server does not answer."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).read()
    except Exception as err:
        raise ConfigError(f"tracking.uri={uri} is unreachable ({err}); start it with scripts/mlflow_server.sh") from err


def ensure_experiment(tracking: TrackingConfig, name: str) -> str:
    """The id of experiment ``name``, created (with a local artifact root for sqlite stores) if new.

    Remembered per process: a study's worker opens a run per trial (the lookup cost ~4 ms each)."""
    key = (tracking.uri, name)
    if key not in _experiment_ids:
        _experiment_ids[key] = _find_or_create_experiment(tracking, name)
    return _experiment_ids[key]


_experiment_ids: dict[tuple[str, str], str] = {}


def _find_or_create_experiment(tracking: TrackingConfig, name: str) -> str:
    mlflow_client = client(tracking.uri)
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if not tracking.uri.startswith(("http://", "https://", "databricks")):
        location = Path(tracking.artifact_root).resolve().as_uri()
    try:
        return mlflow_client.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it meanwhile
        return mlflow_client.get_experiment_by_name(name).experiment_id


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"model": {"depth": 4}}`` -> ``{"model.depth": 4}``; empty/None groups are dropped."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif value is not None:
            flat[name] = value
    return flat


def trial_params(config: dict) -> dict[str, str]:
    """The five axes (group axes by name) plus the flattened config, as MLflow params."""
    trial_part = {k: v for k, v in config.items() if k not in ("study", "cluster", "space")}
    params = {k: str(v) for k, v in flatten(trial_part).items()}
    for axis in AXES:
        value = config[axis]
        params[axis] = str(value["name"] if isinstance(value, dict) else value)
    return params


@functools.lru_cache(maxsize=1)
def provenance() -> dict[str, str]:
    """Tags that say what produced a run: code version, packages, host."""
    tags = {"git_commit": _git_commit(), "python": platform.python_version(), "host": socket.gethostname()}
    for package in ("torch", "mlflow", "optuna", "ray", "hydra-core"):
        try:
            tags[f"version.{package}"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return tags


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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

        self._pending_params += [Param(k, v[:6000]) for k, v in params.items()]
        self._pending_tags += [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        if not buffered:
            self.flush()

    def log_metrics(self, step: int, metrics: dict[str, float], buffered: bool = False,
                    timestamp_ms: Optional[int] = None) -> None:
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

    def log_file(self, path: Path, artifact_dir: Optional[str] = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_dir)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dir(self, local_dir: Path, artifact_dir: Optional[str] = None) -> None:
        """Every file of ``local_dir`` under the run's artifact directory ``artifact_dir``."""
        if self.artifact_uri is None:
            self.client.log_artifacts(self.run_id, str(local_dir), artifact_dir)
            return
        # The repository straight from the run's artifact URI: MlflowClient would first read the
        # run back from the store to learn it (a query per trial in a study's workers).
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        get_artifact_repository(self.artifact_uri, tracking_uri=resolve_uri(self.uri)).log_artifacts(str(local_dir), artifact_dir)

    def log_files(self, files: dict[str, bytes], artifact_dir: Optional[str] = None) -> None:
        """Files given as ``{relative path: content}`` (a worker's journal), in one upload; where the
        run's artifacts live in a local directory, written there at once (no temporary copy)."""
        local = _local_directory(self.artifact_uri)
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
            self.set_tags({"failure_reason": reason[:5000]}, buffered=True)
        self.flush()
        self.client.set_terminated(self.run_id, status=status, end_time=end_ms)
        self.ended = True


def _write_files(root: Path, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def _local_directory(artifact_uri: Optional[str]) -> Optional[Path]:
    """The directory of a ``file:`` (or plain path) artifact URI; None for a server's or a cloud's."""
    if artifact_uri is None:
        return None
    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(url2pathname(parsed.path))
    return Path(artifact_uri) if parsed.scheme == "" else None


def start_run(tracking: TrackingConfig, experiment: str, parent_run_id: Optional[str] = None,
              run_name: Optional[str] = None, tags: Optional[dict] = None, reproducible: bool = False,
              start_ms: Optional[int] = None) -> Run:
    """A new run in ``experiment`` (created if new), tagged with provenance (and its parent).

    ``reproducible``: a trial's run, tagged with the command that re-runs it. ``start_ms``: when
    it started, if not now (a worker's journal, written by the driver).
    """
    if parent_run_id:
        _check_parent_store(tracking.uri)
    experiment_id = ensure_experiment(tracking, experiment)
    all_tags = {**provenance(), **{k: str(v) for k, v in (tags or {}).items()}}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client(tracking.uri).create_run(experiment_id, start_time=start_ms, run_name=run_name, tags=all_tags)
    handle = Run(tracking.uri, run.info.run_id, run.info.artifact_uri)
    if reproducible:  # with the run's first write
        handle.set_tags({"reproduce": f"python -m pipeline reproduce {handle.run_id}"}, buffered=True)
    return handle


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


def find_runs(tracking: TrackingConfig, experiment: str, tags: dict[str, Any], status: Optional[str] = None) -> list[str]:
    """Ids of the runs in ``experiment`` whose tags equal ``tags`` (and whose status is ``status``)."""
    found = client(tracking.uri).get_experiment_by_name(experiment)
    if found is None:
        return []
    clauses = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    if status:
        clauses.append(f"attributes.status = '{status}'")
    runs = client(tracking.uri).search_runs([found.experiment_id], " and ".join(clauses), max_results=5000)
    return [r.info.run_id for r in runs]


def log_trial_artifacts(recorder: Run, config: dict, layer_table: list[dict], model=None, plot: bool = True) -> None:
    """The resolved config, the per-layer diagnostics (CSV and plot) and the final weights, in one upload."""
    from pipeline.nn.initializers import save_weights

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / CONFIG_ARTIFACT).write_text(yaml.dump(config, Dumper=_YAML_DUMPER, sort_keys=False))
        if layer_table:
            (root / "diagnostics").mkdir()
            _write_csv(root / "diagnostics" / "layers.csv", layer_table)
            if plot:
                from pipeline.report import plot_signal_by_depth

                plot_signal_by_depth(layer_table, root / "diagnostics" / "signal_by_depth.png")
        if model is not None:
            save_weights(model, root / WEIGHTS_ARTIFACT)
        recorder.log_dir(root)


# libyaml's dumper writes the same text as yaml.safe_dump, ~5x faster (3.3 -> 0.7 ms a trial config).
_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def _write_csv(path: Path, rows: Iterable[dict]) -> None:
    rows = list(rows)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def download_weights(run_id: str, tracking_uri: Optional[str] = None) -> Path:
    """A local copy of a run's final weights (for ``initializer=pretrained initializer.run_id=...``)."""
    return _download(run_id, WEIGHTS_ARTIFACT, tracking_uri)


#: A batch member's tags: which batch (one id per Ray task's batch) and its place in it.
BATCH_ID_TAG, BATCH_INDEX_TAG = "trial_batch_id", "trial_batch_index"


def batch_mates(uri: str, run_id: str) -> list[str]:
    """The runs that trained in one batch with ``run_id``, in the batch's order and itself
    included; ``[run_id]`` for a run that trained alone (or before batches were tagged)."""
    mlflow_client = client(uri)
    run = mlflow_client.get_run(run_id)
    batch_id = run.data.tags.get(BATCH_ID_TAG)
    if batch_id is None:
        return [run_id]
    mates = mlflow_client.search_runs([run.info.experiment_id], f"tags.`{BATCH_ID_TAG}` = '{batch_id}'", max_results=5000)
    return [r.info.run_id for r in sorted(mates, key=lambda r: int(r.data.tags[BATCH_INDEX_TAG]))]


def download_config(run_id: str, tracking_uri: Optional[str] = None) -> dict:
    """A run's resolved config (for ``reproduce``)."""
    return yaml.safe_load(_download(run_id, CONFIG_ARTIFACT, tracking_uri).read_text())


def _download(run_id: str, artifact: str, tracking_uri: Optional[str]) -> Path:
    import mlflow.artifacts

    uri = resolve_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", TrackingConfig().uri))
    _quiet_logs()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        # MLflow would create an empty store just to say the run is not in it.
        raise ConfigError(f"cannot fetch '{artifact}' of MLflow run {run_id}: there is no MLflow store at "
                          f"{uri} (check tracking.uri)")
    try:
        dst = tempfile.mkdtemp(prefix="initstudy-")
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=dst, tracking_uri=uri)
    except Exception as err:
        raise ConfigError(f"cannot fetch '{artifact}' of MLflow run {run_id} from {uri}: {' '.join(str(err).split())[:300]}") from err
    return Path(local)


# ---- reading a study back (the report) ----------------------------------------------------------


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


def _record(run) -> RunRecord:
    return RunRecord(run.info.run_id, run.info.run_name or "", run.info.status, dict(run.data.params),
                     dict(run.data.tags), dict(run.data.metrics), run.info.artifact_uri)


def study_names(uri: str) -> list[str]:
    """Names of the experiments that hold a study (a run tagged ``initstudy.role=study``)."""
    mlflow_client = client(uri)
    names, token = {}, None
    while True:  # every page of experiments
        page = mlflow_client.search_experiments(max_results=1000, page_token=token)
        names.update({e.experiment_id: e.name for e in page})
        token = page.token
        if not token:
            break
    if not names:
        return []
    runs = _search_all(mlflow_client, list(names), "tags.`initstudy.role` = 'study'")
    return sorted({names[r.info.experiment_id] for r in runs})


def study_runs(uri: str, study: str) -> tuple[RunRecord, list[RunRecord]]:
    """The parent run of ``study`` and its trial runs (one per trial and seed).

    Raises:
        ConfigError: the store does not exist, or holds no study of that name (the message lists
            the studies it does hold).
    """
    _check_store_exists(uri)
    mlflow_client = client(uri)
    found = mlflow_client.get_experiment_by_name(study)
    parents = _search_all(mlflow_client, [found.experiment_id], "tags.`initstudy.role` = 'study'") if found else []
    if not parents:
        names = study_names(uri)
        listing = f"studies here: {', '.join(names)}" if names else "no study is recorded there yet"
        raise ConfigError(f"unknown study '{study}' in {resolve_uri(uri)}; {listing}")
    children = _search_all(mlflow_client, [found.experiment_id], "tags.`initstudy.role` = 'trial'")
    return _record(parents[0]), [_record(r) for r in children]


def _search_all(mlflow_client, experiment_ids: list[str], filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = mlflow_client.search_runs(experiment_ids, filter_string, max_results=5000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _check_store_exists(uri: str) -> None:
    # Reading a store must not create an empty one (MLflow creates a missing sqlite file silently).
    if uri.startswith("sqlite:///"):
        path = Path(resolve_uri(uri)[len("sqlite:///"):])
        if not path.exists():
            raise ConfigError(f"no MLflow store at {path} (tracking.uri={uri}); run a study first or pass tracking.uri=...")


def metric_histories(uri: str, run_id: str, keys: Iterable[str]) -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value), ...]}`` sorted by step, for each of ``keys`` the run has logged."""
    mlflow_client = client(uri)
    histories = {}
    for key in keys:
        points = mlflow_client.get_metric_history(run_id, key)
        if points:
            histories[key] = sorted((m.step, m.value) for m in points)
    return histories


def download_artifact(uri: str, run_id: str, artifact: str, dst: Path, artifact_uri: Optional[str] = None) -> Optional[Path]:
    """A local copy of one artifact of a run under ``dst`` (where the run's ``artifact_uri`` is a
    local directory: the file itself, to read only), or None if the run has no such artifact.

    A local file is not copied through MLflow's ``runs:/`` route, which reads the run twice and
    looks for logged models first (~35 ms a run: most of a report's reading on sqlite).
    """
    local_dir = _local_directory(artifact_uri)
    if local_dir is not None:
        path = local_dir / artifact
        return path if path.is_file() else None
    import mlflow.artifacts

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per run swamps the log
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=str(dst),
                                                    tracking_uri=resolve_uri(uri))
    except Exception:  # missing artifact (failed trial, diagnostics off): the report notes the gap
        return None
    return Path(local)


def run_experiment(uri: str, run_id: str) -> str:
    """The name of the experiment a run belongs to."""
    mlflow_client = client(uri)
    return mlflow_client.get_experiment(mlflow_client.get_run(run_id).info.experiment_id).name


def command_line() -> str:
    return " ".join(["python -m pipeline", *sys.argv[1:]])
