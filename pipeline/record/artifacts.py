"""A trial's artifacts: written in one upload as its run ends, and fetched back (reproduce,
pretrained starts, the report)."""

from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

import yaml

from pipeline.config import ConfigError, TrackingConfig, one_line, user_cache_dir
from pipeline.config.stores import masked_tree
from pipeline.record import names
from pipeline.record.runs import local_directory
from pipeline.record.store import quiet_logs
from pipeline.record.uris import local_store, resolve_uri

# A progress bar per download swamps a report's log and a command's one-line output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# libyaml's dumper writes the same text as yaml.safe_dump, ~5x faster (a trial config: 0.7 ms).
_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def log_trial_artifacts(recorder, config: dict, layer_table: list[dict], model=None, plot: bool = True) -> None:
    """The resolved config, the per-layer diagnostics (CSV and plot) and the final weights, in one
    upload, made in memory: a short trial's temporary directory cost as much as its record.

    ``recorder``: a ``runs.Run`` or a journal's run (pipeline/record/journal.py).
    """
    config_text = yaml.dump(masked_tree(config), Dumper=_YAML_DUMPER, sort_keys=False)
    files = {names.CONFIG_ARTIFACT: config_text.encode()}
    if layer_table:
        files[names.LAYERS_ARTIFACT] = _csv_bytes(layer_table)
        if plot:
            from pipeline.record.trial_plot import plot_signal_by_depth

            figure = io.BytesIO()
            plot_signal_by_depth(layer_table, figure)
            files[names.LAYER_PLOT_ARTIFACT] = figure.getvalue()
    if model is not None:
        from pipeline.engine.weights import weights_bytes

        files[names.WEIGHTS_ARTIFACT] = weights_bytes(model)
    recorder.log_files(files)


def _csv_bytes(rows: Iterable[dict]) -> bytes:
    rows = list(rows)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode()


def download_weights(run_id: str, tracking_uri: Optional[str] = None) -> Path:
    """A local copy of a run's final weights (for ``initializer=pretrained initializer.run_id=...``),
    kept in this node's cache (a run's artifacts never change): fetched once, reused by later trials."""
    cached = user_cache_dir() / "weights" / run_id / Path(names.WEIGHTS_ARTIFACT).name
    if cached.is_file():
        return cached
    with tempfile.TemporaryDirectory(prefix="initstudy-") as tmp:
        fetched = _download(run_id, names.WEIGHTS_ARTIFACT, tracking_uri, tmp)
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_name(f".{cached.name}.{os.getpid()}.partial")
            shutil.copyfile(fetched, partial)
            os.replace(partial, cached)  # atomic: a concurrent trial sees the whole file or none
        except OSError as err:
            raise ConfigError(
                f"cannot keep the weights of run {run_id} in {cached.parent} ({err.strerror or err})"
            ) from err
    return cached


def download_config(run_id: str, tracking_uri: Optional[str] = None) -> dict:
    """A run's resolved config (for ``reproduce``)."""
    with tempfile.TemporaryDirectory(prefix="initstudy-") as tmp:
        text = _download(run_id, names.CONFIG_ARTIFACT, tracking_uri, tmp).read_text()
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:  # an edited file: a python tag, a syntax error
        raise ConfigError(
            f"the {names.CONFIG_ARTIFACT} of run {run_id} is not plain YAML: {one_line(err, 200)}"
        ) from err


def _download(run_id: str, artifact: str, tracking_uri: Optional[str], dst: str) -> Path:
    import mlflow.artifacts

    uri = resolve_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", TrackingConfig().uri))
    quiet_logs()
    if local_store(uri) is not None and not local_store(uri).exists():
        # MLflow would create an empty store just to say the run is not in it.
        raise ConfigError(
            f"cannot fetch '{artifact}' of MLflow run {run_id}: there is no MLflow store at {uri} (check tracking.uri)"
        )
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact, dst_path=dst, tracking_uri=uri
        )
    except Exception as err:
        raise ConfigError(f"cannot fetch '{artifact}' of MLflow run {run_id} from {uri}: {one_line(err, 300)}") from err
    return Path(local)


def download_artifact(
    uri: str, run_id: str, artifact: str, dst: Path, artifact_uri: Optional[str] = None
) -> Optional[Path]:
    """A local copy of one artifact of a run under ``dst`` (where the run's ``artifact_uri`` is a
    local directory: the file itself, to read only), or None if the run has no such artifact.

    A local file is not copied through MLflow's ``runs:/`` route, which reads the run twice and
    looks for logged models first (~35 ms a run: most of a report's reading on sqlite).
    """
    local_dir = local_directory(artifact_uri)
    if local_dir is not None:
        path = local_dir / artifact
        return path if path.is_file() else None
    import mlflow.artifacts

    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact, dst_path=str(dst), tracking_uri=resolve_uri(uri)
        )
    except Exception:  # missing artifact (failed trial, diagnostics off): the report notes the gap
        return None
    return Path(local)
