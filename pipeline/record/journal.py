"""A trial's MLflow record written where it trains, and written to the store beside the study's driver.

A study's workers do not import MLflow (2 CPU-seconds of every worker's start-up, and a store
that every node would have to reach): they record into ``JournalRun``s, which have the methods of
``runs.Run`` that ``pipeline.record.runner`` uses. Each flush hands the operations logged since the
last one to an ``outbox`` as plain data; the worker streams them back to the driver (a Ray
generator task, pipeline/study/worker.py), and a ``Replay`` on the driver's node applies them to
real runs, with the worker's timestamps: in the driver's MLflow writer processes
(pipeline/record/writers.py), or in the driver itself. Workers never write to the store.

A journal's run is known by its ``key`` until its writer has created the MLflow run; the
``reproduce`` tag, which names the run, is set by the writer when it creates it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from pipeline.config import TrackingConfig
from pipeline.record import tables
from pipeline.record.provenance import provenance
from pipeline.record.runs import (  # MLflow only where a store is written
    FLUSH_EVERY_S,
    EndsOnExit,
    WholeRun,
    start_run,
    write_whole_runs,
)

Outbox = Callable[[str, list], None]  # (run key, operations) -> None


class JournalRun(EndsOnExit):
    """``runs.Run``'s interface; operations go to ``outbox`` at each flush instead of a store."""

    def __init__(self, outbox: Outbox, opening: dict) -> None:
        self.outbox, self.run_id = outbox, f"journal-{uuid.uuid4().hex}"
        self.ended = False
        self.flush_every_s = FLUSH_EVERY_S
        self._ops: list[tuple] = [("open", {**opening, "start_ms": _now_ms()})]
        # The first flush comes at most FLUSH_EVERY_S from now, whatever ``flush_every_s`` becomes:
        # a long trial's run is RUNNING in the store by then, and a short trial's whole record
        # travels in one flush (the driver then writes it in one create, one batch, one end).
        self._flushed_at, self._sent = time.monotonic(), False

    def log_params(self, params: dict[str, str], tags: Optional[dict[str, Any]] = None, buffered: bool = False) -> None:
        self._add(("params", dict(params), _strings(tags or {})), buffered)

    def log_metrics(self, step: int, metrics: dict[str, float], buffered: bool = False) -> None:
        self._add(("metrics", step, {k: float(v) for k, v in metrics.items()}, _now_ms()), buffered)

    def set_tags(self, tags: dict[str, Any], buffered: bool = False) -> None:
        self._add(("tags", _strings(tags)), buffered)

    def log_dir(self, local_dir: Path, artifact_dir: Optional[str] = None) -> None:
        """Every file of ``local_dir``, read now: the driver may run on another host."""
        files = {
            str(path.relative_to(local_dir)): path.read_bytes()
            for path in sorted(Path(local_dir).rglob("*"))
            if path.is_file()
        }
        self.log_files(files, artifact_dir)

    def log_files(self, files: dict[str, bytes], artifact_dir: Optional[str] = None) -> None:
        """Files given as ``{relative path: content}``, as ``runs.Run.log_files`` takes them."""
        self._add(("files", artifact_dir, dict(files)), buffered=True)

    def end(self, status: str, reason: Optional[str] = None) -> None:
        if self.ended:
            return
        self._add(("end", status, reason, _now_ms()), buffered=False)
        self.ended = True

    def flush(self) -> None:
        ops, self._ops = self._ops, []
        self._flushed_at = time.monotonic()
        if ops:
            self.outbox(self.run_id, ops)
            self._sent = True

    def _add(self, op: tuple, buffered: bool) -> None:
        self._ops.append(op)
        every = self.flush_every_s if self._sent else min(self.flush_every_s, FLUSH_EVERY_S)
        if not buffered or time.monotonic() - self._flushed_at >= every:
            self.flush()


def journal_starter(outbox: Outbox) -> Callable[..., JournalRun]:
    """A ``runs.start_run`` look-alike whose runs are journals sent to ``outbox``."""

    def start_journal_run(
        tracking_cfg: TrackingConfig,
        experiment: str,
        parent_run_id: Optional[str] = None,
        run_name: Optional[str] = None,
        tags: Optional[dict] = None,
        reproducible: bool = False,
    ) -> JournalRun:
        opening = {
            "experiment": experiment,
            "parent_run_id": parent_run_id,
            "run_name": run_name,
            "tags": _strings({**provenance(), **(tags or {})}),
            "reproducible": reproducible,
        }
        return JournalRun(outbox, opening)

    return start_journal_run


def opening_tags(ops: list[tuple]) -> Optional[dict[str, str]]:
    """The tags a journal's run opens with, if ``ops`` (one flush) opens it; else None."""
    return ops[0][1]["tags"] if ops and ops[0][0] == "open" else None


def _strings(tags: dict) -> dict[str, str]:
    return {k: str(v) for k, v in tags.items()}


def _now_ms() -> int:
    return int(time.time() * 1000)


class Replay:
    """The writing side (pipeline/record/writers.py): applies journals to MLflow runs in ``tracking_cfg``'s store."""

    def __init__(self, tracking_cfg: TrackingConfig) -> None:
        self.tracking_cfg = tracking_cfg
        self.runs: dict[str, Any] = {}  # journal key -> runs.Run
        self.writes_whole = tables.writable(tracking_cfg.uri)  # a database store: whole runs in bulk

    def apply_many(self, flushes: list[tuple[str, list[tuple]]]) -> None:
        """Flushes of several journals (``(key, ops)``, in order): those that are a whole run (a
        short trial's, opened and ended in one flush) written together in one transaction."""
        whole = []
        for key, ops in flushes:
            if self._is_whole(ops):
                whole.append((key, ops))
            else:
                self.apply(key, ops)
        if whole:
            handles = write_whole_runs(self.tracking_cfg, [_whole_run(ops) for _, ops in whole])
            self.runs.update(zip([key for key, _ in whole], handles))

    def _is_whole(self, ops: list[tuple]) -> bool:
        return (
            self.writes_whole
            and len(ops) > 1
            and ops[0][0] == "open"
            and ops[-1][0] == "end"
            and bool(ops[0][1]["run_name"])
        )

    def apply(self, key: str, ops: list[tuple]) -> None:
        """One flush of one journal; the run's buffered writes go to the store in one call."""
        for op in ops:
            if op[0] == "open":
                self.runs[key] = start_run(self.tracking_cfg, **op[1])
            else:
                self._apply_one(self.runs[key], op)
        run = self.runs[key]
        if not run.ended:
            run.flush()

    def _apply_one(self, run, op: tuple) -> None:
        kind = op[0]
        if kind == "params":
            run.log_params(op[1], tags=op[2], buffered=True)
        elif kind == "metrics":
            run.log_metrics(op[1], op[2], buffered=True, timestamp_ms=op[3])
        elif kind == "tags":
            run.set_tags(op[1], buffered=True)
        elif kind == "files":
            run.log_files(op[2], op[1])
        elif kind == "end":
            run.end(op[1], reason=op[2], end_ms=op[3])

    def run_id(self, key: str) -> Optional[str]:
        run = self.runs.get(key)
        return run.run_id if run is not None else None

    def open_runs(self, keys) -> list[str]:
        """Those of ``keys`` whose runs are open (their worker died before it ended them)."""
        return [key for key in keys if key in self.runs and not self.runs[key].ended]

    def ended(self, key: str) -> bool:
        return key in self.runs and self.runs[key].ended

    def end_open(self, keys, reason: str) -> list[str]:
        """End FAILED, with ``reason``, the runs of ``keys`` still open; their keys."""
        ended = self.open_runs(keys)
        for key in ended:
            self.runs[key].end("FAILED", reason=reason)
        return ended

    def tag(self, keys, tags: dict[str, str]) -> None:
        """Set ``tags`` on the runs of ``keys``, ended or not."""
        for key in keys:
            if key in self.runs:
                self.runs[key].set_tags(tags)

    def forget(self, keys) -> None:
        """Drop finished journals: a long study's driver must not keep every run's handle."""
        for key in keys:
            self.runs.pop(key, None)


def _whole_run(ops: list[tuple]) -> WholeRun:
    """A journal's whole run (its one flush, ``open`` to ``end``) as a ``runs.WholeRun``."""
    opening, end = ops[0][1], ops[-1]
    run = WholeRun(
        experiment=opening["experiment"],
        run_name=opening["run_name"],
        parent_run_id=opening["parent_run_id"],
        opening_tags=opening["tags"],
        reproducible=opening["reproducible"],
        start_ms=opening["start_ms"],
        status=end[1],
        reason=end[2],
        end_ms=end[3],
    )
    for op in ops[1:-1]:
        if op[0] == "params":
            run.params.update(op[1])
            run.tags.update(op[2])
        elif op[0] == "metrics":
            run.metrics += [(key, value, op[3], op[1]) for key, value in op[2].items()]
        elif op[0] == "tags":
            run.tags.update(op[1])
        elif op[0] == "files":
            run.files.append((op[1], op[2]))
    return run
