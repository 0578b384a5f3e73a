"""The study coordinator: Optuna asks, Ray runs, MLflow records.

Who owns what: Optuna owns sampling, pruning decisions and trial states (in persistent storage, so
a study resumes); Ray owns placement, resources and retries of dead workers; MLflow owns the
record (a parent run per study, a child run per trial and seed). The driver runs a small
ask-and-tell loop: it asks Optuna for a configuration, turns it into overrides of the composed
config, sends one Ray task per seed, and tells Optuna the outcome when all seeds are back.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import optuna
from optuna.trial import TrialState

from pipeline.config import ConfigError
from pipeline.engine.download import ensure_dataset
from pipeline.record import journal, names
from pipeline.record.store import open_store
from pipeline.record.uris import check_reachable, check_writable
from pipeline.record.writers import Writers
from pipeline.study import cluster, space
from pipeline.study import objectives as obj
from pipeline.study.grouping import batch_key, task_cost
from pipeline.study.lock import StudyLock
from pipeline.study.optuna_journal import SNAPSHOT_EVERY, ask_new, held_appends, save_snapshot, set_user_attrs
from pipeline.study.plan import StudyPlan, blind_trials, plan_study
from pipeline.study.progress import Progress
from pipeline.study.storage import check_storage, open_storage, repair_torn_tail, unreadable
from pipeline.study.study_run import StudyRun, state_tags, untagged_runs
from pipeline.study.worker import PruneDecider, trial_task, warm_up

optuna.logging.set_verbosity(optuna.logging.WARNING)

POLL_S = 0.5
RECORD_POLL_S = 0.02  # how long the loop waits on Ray while trials wait for their runs' writers
ABANDON_WAIT_S = 10.0  # how long a stopping study waits for its cancelled tasks' workers to die


@dataclass
class _Pending:
    """One Optuna trial in flight: a Ray task per seed."""

    trial: optuna.trial.Trial
    params: dict
    seeds: list[int]
    results: dict[int, dict] = field(default_factory=dict)  # seed index -> worker result
    failures: dict[int, str] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)  # every run's journal key (retries included)


@dataclass
class _Task:
    """One Ray task in flight: its (trial, seed index) members, what it was sent, its runs' journals."""

    members: list[tuple[_Pending, int]]
    payloads: list[dict]
    attempt: int = 0
    keys: list[str] = field(default_factory=list)  # its journals, as opened


@dataclass
class StudyDone:
    """What a study leaves for its command: the summary, and where its record is (for the report)."""

    name: str
    tracking_uri: str
    output_dir: str
    storage: str
    parent_run_id: str
    report: bool  # study.report: the command builds the study report
    summary: dict = field(default_factory=dict)


class StudyFailed(RuntimeError):
    """The study stopped itself (failure rate over its limit); ``done``: what it recorded."""

    def __init__(self, message: str, done: Optional[StudyDone] = None) -> None:
        super().__init__(message)
        self.done = done


def run_study(cli_overrides: list[str]) -> StudyDone:
    """Plan (everything validated before Ray starts), then run the ask-and-tell loop."""
    plan = plan_study(cli_overrides)
    if plan.pinned:
        print(
            f"note: {' '.join(plan.pinned)} fixed on the command line: not sampled (space.<key>=... samples it)",
            file=sys.stderr,
        )
    check_reachable(plan.cfg.tracking.uri)
    check_writable(plan.cfg.tracking.uri, plan.cfg.tracking.artifact_root)
    check_storage(plan.storage)
    for dataset in plan.datasets():  # on this node before Ray starts: offline is one line, not failed trials
        ensure_dataset(dataset)
    study_cfg = plan.cfg.study
    with StudyLock(Path(study_cfg.output_dir, study_cfg.name), study_cfg.name):  # one driver per study
        repair_torn_tail(plan.storage)
        return _run_locked(plan)


def _run_locked(plan: StudyPlan) -> StudyDone:
    """Start Ray and open the stores (overlapped), recover what a dead driver left, run the loop."""
    # Opening the stores and composing the trials' configs take seconds, and so does starting Ray:
    # overlap them (one thread: the MLflow store, then the Optuna study and the compositions).
    setup = ThreadPoolExecutor(max_workers=1)
    mlflow_ready = setup.submit(_open_mlflow_store, plan)
    optuna_ready = setup.submit(_open_optuna_study_and_precompose, plan)
    writers = Writers(plan.cfg.tracking, plan.writers)  # they import MLflow meanwhile too
    try:
        return _run_with_writers(plan, writers, mlflow_ready, optuna_ready)
    finally:
        writers.close()


def _run_with_writers(plan: StudyPlan, writers: Writers, mlflow_ready, optuna_ready) -> StudyDone:
    with cluster.session(plan.cfg.cluster) as resources:
        slots = cluster.concurrency(plan.cfg.cluster, resources)
        # Workers import torch while the driver opens its stores and asks for the first trials.
        cluster.warm_up(warm_up, slots, plan.cfg.cluster)
        mlflow_ready.result()
        study = optuna_ready.result()
        record = StudyRun.open(plan, finished=len(counted_trials(study)))
        _recover_interrupted(study, record)
        loop = None
        try:
            loop = _Loop(plan, study, record, slots, writers)
            loop.run()
            save_snapshot(study._storage)
            writers.sync()  # the runs' last tags are in the store before the summary reads it
            return _done(plan, record, record.finish(study, plan))
        except BaseException as err:
            if loop is not None:
                with contextlib.suppress(Exception):  # the study's own error is the one to report
                    loop.abandon(f"the study stopped ({type(err).__name__}) while this trial ran")
                with contextlib.suppress(Exception):
                    save_snapshot(study._storage)
            _record_stop(record, study, plan, err)
            raise


def _done(plan: StudyPlan, record: StudyRun, summary: dict) -> StudyDone:
    cfg = plan.cfg
    return StudyDone(
        cfg.study.name,
        cfg.tracking.uri,
        cfg.study.output_dir,
        plan.storage,
        record.parent.run_id,
        cfg.study.report,
        summary,
    )


def _record_stop(record: StudyRun, study: optuna.Study, plan: StudyPlan, err: BaseException) -> None:
    """End the study's run FAILED (KILLED for Ctrl-C); a study that stopped itself for its failure
    rate is summarized first (and its command reports it): which trials failed, and why, is what
    its user needs."""
    if isinstance(err, StudyFailed):
        with contextlib.suppress(Exception):  # a summary that fails must not hide why the study stopped
            err.done = _done(plan, record, record.finish(study, plan, stopped_by=err))
            return
    record.fail(err)


def _open_mlflow_store(plan: StudyPlan) -> None:
    # Nodes on other hosts may share a sqlite store over a network filesystem, where SQLite's
    # write-ahead log does not work: a new store for a cluster keeps the default journal.
    # The experiment is not made here: a study that StudyRun.open refuses (recorded in another
    # store) must leave none behind; its parent run makes it.
    open_store(plan.cfg.tracking.uri, write_ahead=not plan.cfg.cluster.address)


def _open_optuna_study_and_precompose(plan: StudyPlan) -> optuna.Study:
    """The Optuna study; then the trial configs' Hydra compositions, which the first asks would
    otherwise wait for."""
    study = _open_optuna_study(plan)
    plan.precompose()
    return study


def _open_optuna_study(plan: StudyPlan) -> optuna.Study:
    directions = [obj.direction(name) for name in plan.cfg.study.objectives]
    try:
        return optuna.create_study(
            storage=open_storage(plan.storage),
            study_name=plan.cfg.study.name,
            sampler=plan.sampler,
            pruner=plan.pruner,
            directions=directions,
            load_if_exists=True,
        )
    except ValueError as err:  # a journal with a damaged record in its middle (JSONDecodeError is one)
        if isinstance(err, json.JSONDecodeError) or "Invalid log format" in str(err):
            raise unreadable(plan.storage, err) from err
        raise


def _recover_interrupted(study: optuna.Study, record: StudyRun) -> None:
    """Trials left RUNNING by a driver that died: mark them FAIL and queue their params again."""
    ended, reason = [], "the driver stopped mid-trial"
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        handle = optuna.trial.Trial(study, trial._trial_id)
        set_user_attrs(handle, {"interrupted": True, "failure_reason": reason})
        ended.append(study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True))
        study.enqueue_trial(trial.params, skip_if_exists=False)
    record.trials_ended(ended, reason)
    record.close_stale_runs(reason)


def counted_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that count towards ``n_trials``: finished ones, except those a dead driver left."""
    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return [t for t in study.get_trials(deepcopy=False, states=finished) if not t.user_attrs.get("interrupted")]


class _Loop:
    """The dispatch loop: keeps ``slots`` Ray tasks busy until ``n_trials`` trials have ended.

    Asked trials wait in the driver's queue as tasks, costliest first, and a task goes to Ray only
    when a slot is free (Ray would not keep their order). Tasks stream their runs' journals back
    as they train; the driver hands them to its MLflow writers (pipeline/record/writers.py), ends the
    runs of a dead worker, and sends its task again (``study.retries`` times). A trial whose seeds
    are all back waits in ``recording`` until the writers report its runs ended in the store; then
    Optuna is told (so Optuna never counts a trial that MLflow lacks).

    Each Ray task trains one or more (trial, seed) members: with ``study.trial_batching``, members
    whose configs share a ``batch_key`` go together (pipeline/engine/batched.py). While the sampler draws
    without looking at results (random, qmc, grid: always; tpe: its first ``TPE_STARTUP_TRIALS``,
    drawn at random) it is asked ahead, up to ``trial_batch_max`` trials per slot, so there is
    something to batch; otherwise (tpe after its start-up, nsga2, any study with a pruner) for one
    trial per free slot, as without batching, and only its seeds train together.
    """

    def __init__(self, plan: StudyPlan, study: optuna.Study, record: StudyRun, slots: int, writers: Writers) -> None:
        self.plan, self.study, self.record, self.slots, self.writers = plan, study, record, slots, writers
        self.pending: dict[Any, _Task] = {}  # Ray stream -> its task
        self.queued: list[list[tuple]] = []  # asked, grouped, not yet sent: costliest first
        self.in_flight: dict[int, _Pending] = {}  # Optuna trial number -> trial
        self.recording: list[_Pending] = []  # every seed back; waiting for the writers to end its runs
        counted = counted_trials(study)
        self.asked = len(study.get_trials(deepcopy=False))  # every trial so far, any state
        self.waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))  # enqueued: asked first
        self.done = len(counted)
        self.failed = sum(t.state == TrialState.FAIL for t in counted)  # kept up to date: no re-read per trial
        self.last_failure = "?"
        self.oracle = (
            cluster.start_oracle(PruneDecider(plan.storage, plan.cfg.study.name, plan.pruner)) if plan.prunes else None
        )
        self.progress = Progress(study, self.done, plan.n_trials, enabled=plan.cfg.study.progress)
        self.batch_max = plan.cfg.study.trial_batch_max if plan.cfg.study.trial_batching else 1
        # Trials whose runs the writers have yet to end: past this many, the driver asks for no
        # more (the writers fall behind the workers: dispatching more would only queue records).
        self.recording_max = max(64, 4 * slots * self.batch_max)

    def run(self) -> None:
        with _interrupts_between_steps() as stop:
            while self._wanted() > 0 or self.pending or self.queued or self.recording:
                if stop:  # a Ctrl-C or SIGTERM came during the last step: stop here, between steps
                    raise KeyboardInterrupt
                self._step()
        self.progress.close()

    def _step(self) -> None:
        """Ask, send, take what came back, tell what is recorded."""
        self._refill()
        self._send()
        if self.pending:
            self._take_streams(RECORD_POLL_S if self.recording else POLL_S)
            self.writers.poll()
        else:
            self.writers.poll(POLL_S)
        self._tell_recorded()

    def _take_streams(self, timeout_s: float) -> None:
        ready = cluster.wait(list(self.pending), timeout_s)[0]
        items = [(self.pending[stream], *cluster.next_item(stream)) for stream in ready]
        for stream, (_task, item, _, _) in zip(ready, items):
            if item is None or "outcomes" in item:
                del self.pending[stream]
        self._send()  # the freed workers start their next task before the driver handles the record
        for task, item, reason, died in items:
            self._receive(task, item, reason, died)

    def abandon(self, reason: str) -> None:
        """Stop the tasks in flight and end their runs FAILED: a stopped study leaves none RUNNING.

        Trials whose every seed came back are told to Optuna once the writers have ended their runs
        (work done is kept); the others stay RUNNING: a rerun of the study marks them FAIL and
        queues their params again (``_recover_interrupted``).
        """
        streams = list(self.pending)
        cluster.cancel(streams)
        cluster.settle(streams, ABANDON_WAIT_S)
        with contextlib.suppress(Exception):  # a writer that failed: the store is swept below all the same
            for task in self.pending.values():
                self.writers.end_open(task.keys, reason)
            self.writers.sync()
            self._tell_recorded(check_failures=False)
        self.pending.clear()
        self.record.close_stale_runs(reason=reason)

    def _wanted(self) -> int:
        return self.plan.n_trials - self.done - len(self.in_flight)

    def _asks_ahead(self) -> bool:
        return self._blind_left() == math.inf

    def _blind_left(self) -> float:
        """How many more trials the sampler draws blind: asking for them early changes nothing."""
        # Pruning compares a trial with trials that finished before it: asking ahead would starve it.
        if self.plan.prunes:
            return 0
        # Conservative: a trial that exists in any state counts, as if it had finished.
        return max(0, blind_trials(self.plan.sampler) - self.asked)

    def _refill(self) -> None:
        """Ask the sampler for more trials when the queue runs low.

        A blind sampler is asked ahead, enough to batch and to keep a task per slot waiting here,
        so a worker that finishes starts its next task without waiting for the driver to ask;
        any other is asked for one trial per free slot, when a slot frees, so that it has seen
        every finished trial (during TPE's blind start-up, for up to ``trial_batch_max`` per slot).
        """
        if self._wanted() <= 0 or len(self.recording) >= self.recording_max:
            return
        free = self.slots - len(self.pending)
        if self._asks_ahead():
            if len(self.queued) < self.slots:
                self.queued += self._ask_tasks(self.slots * max(self.batch_max, 2), self.slots)
        elif free > 0 and not self.queued:
            self.queued = self._ask_tasks(min(free * self.batch_max, max(free, self._blind_left())), free)

    def _ask_tasks(self, trials: int, slots: int) -> list[list[tuple]]:
        members = []
        for _ in range(min(self._wanted(), trials)):
            members += self._ask()
        return _task_groups(members, self.batch_max, slots)

    def _send(self) -> None:
        """Send queued tasks to Ray, costliest first, one per free slot.

        The rest wait here, not in Ray: Ray does not start the tasks queued in it in the order
        they were sent (measured: of four sent costliest first, the costliest started last), and a
        long task that starts last leaves the other workers idle at the end of a study.
        """
        while len(self.pending) < self.slots and self.queued:
            group = self.queued.pop(0)
            payloads = [
                self.record.payload(config, pending.trial, index, self.oracle) for pending, index, config in group
            ]
            self._submit(_Task([(pending, index) for pending, index, _ in group], payloads))

    def _submit(self, task: _Task) -> None:
        self.pending[cluster.submit(trial_task, task.payloads, self.plan.cfg.cluster)] = task

    def _ask(self) -> list[tuple[_Pending, int, dict]]:
        """A new trial's (trial, seed index, config) members; none if its configuration is invalid."""
        trial = self.study.ask() if self.waiting else ask_new(self.study)
        self.waiting = max(0, self.waiting - 1)
        self.asked += 1
        with held_appends(self.study):  # a record per suggest, written as one
            params = space.suggest(trial, self.plan.axes)
        pending = _Pending(trial, params, self.plan.seeds())
        self.in_flight[trial.number] = pending
        try:
            configs = [self.plan.trial_config(params, seed) for seed in pending.seeds]
        except ConfigError as err:  # this combination is invalid (e.g. groups vs width): a FAIL
            self._fail_unlaunched(pending, str(err))
            return []
        return [(pending, index, config) for index, config in enumerate(configs)]

    def _fail_unlaunched(self, pending: _Pending, reason: str) -> None:
        for index, seed in enumerate(pending.seeds):
            self.record.failed_run(pending.trial.number, index, seed, pending.params, reason)
            pending.failures[index] = reason
        self._tell(pending)

    def _receive(self, task: _Task, item: Optional[dict], reason: Optional[str], died: bool) -> None:
        """One item of a task's stream: journals to write, its outcomes, or its failure."""
        if item is not None:
            self._write_journals(task, item["journal"])
            if "outcomes" in item:
                self._task_done(task, item["outcomes"])
        elif died and task.attempt < self.plan.cfg.study.retries:
            self.writers.end_open(task.keys, f"{reason}; the trial was retried")
            self._submit(_Task(task.members, task.payloads, task.attempt + 1))
        else:
            self._task_failed(task, reason or "the task ended without a result")

    def _write_journals(self, task: _Task, journals: list[tuple[str, list]]) -> None:
        for key, ops in journals:
            tags = journal.opening_tags(ops)
            self.writers.write(key, ops)
            if tags is not None:  # a new run: one of the task's members
                task.keys.append(key)
                self.in_flight[int(tags[names.OPTUNA_TRIAL_TAG])].keys.append(key)

    def _task_done(self, task: _Task, outcomes: list[dict]) -> None:
        for (pending, index), value in zip(task.members, outcomes):
            self._member_done(pending, index, value)

    def _task_failed(self, task: _Task, reason: str) -> None:
        self.writers.end_open(task.keys, reason)
        for pending, index in task.members:
            self._member_done(pending, index, {"error": reason})

    def _member_done(self, pending: _Pending, index: int, value: dict) -> None:
        if "error" in value:
            pending.failures[index] = value["error"]
        else:
            pending.results[index] = value
        if len(pending.results) + len(pending.failures) == len(pending.seeds):
            self.recording.append(pending)

    def _tell_recorded(self, check_failures: bool = True) -> None:
        """Tell Optuna the trials whose runs have all ended in the store."""
        recorded = [pending for pending in self.recording if self.writers.ended.issuperset(pending.keys)]
        for pending in recorded:
            self.recording.remove(pending)
            self._tell(pending, check_failures)

    def _tell(self, pending: _Pending, check_failures: bool = True) -> None:
        del self.in_flight[pending.trial.number]
        for result in pending.results.values():
            result["run_id"] = self.writers.run_ids[result["run_key"]]
        state, values, attrs = obj.outcome(
            pending.results, pending.failures, pending.seeds, self.plan.cfg.study.objectives
        )
        set_user_attrs(pending.trial, attrs)
        frozen = self.study.tell(pending.trial, values=values, state=state)
        self.writers.tag(untagged_runs(frozen, pending.results, pending.keys), state_tags(frozen))
        self.writers.forget(pending.keys)
        self.done += 1
        if self.done % SNAPSHOT_EVERY == 0:  # a resume replays only the journal's records after it
            save_snapshot(self.study._storage)
        if frozen.state == TrialState.FAIL:
            self.failed += 1
            self.last_failure = frozen.user_attrs.get("failure_reason", "?")
        running = len({pending.trial.number for task in self.pending.values() for pending, _ in task.members})
        self.progress.update(frozen, running, queued=len(self.in_flight) - running, failed=self.failed)
        if check_failures:  # not while stopping: the study's own reason to stop stands
            self._check_failure_rate()

    def _check_failure_rate(self) -> None:
        study_cfg = self.plan.cfg.study
        if self.done >= study_cfg.min_trials_for_failure_rate and self.failed / self.done > study_cfg.max_failure_rate:
            raise StudyFailed(
                f"{self.failed} of {self.done} trials failed (> study.max_failure_rate={study_cfg.max_failure_rate}); "
                f"last reason: {self.last_failure}"
            )


@contextlib.contextmanager
def _interrupts_between_steps():
    """Ctrl-C and SIGTERM noted, not raised mid-step, for the loop to stop between steps: raised
    inside a step, they could leave a trial whose runs were written but whose outcome was never
    read (recorded, not told). A second signal is raised at once. Yields a list that is non-empty
    once a signal came."""
    came: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield came
        return
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}

    def note(signum, frame):
        if came:
            raise KeyboardInterrupt
        came.append(signum)

    for signum, handler in previous.items():
        if callable(handler):  # one that would raise (SIG_IGN and SIG_DFL are left as they are): deferred
            signal.signal(signum, note)
    try:
        yield came
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _task_groups(members: list[tuple], batch_max: int, free: int) -> list[list[tuple]]:
    """Members that share a ``batch_key`` in groups of at most ``batch_max``, split further so
    that, where there are enough members, every free slot gets a task; the costliest first.

    The driver hands tasks to Ray in this order, one per free slot (``_Loop._send``), so costliest
    first is longest-first list scheduling: no worker is left at the end with a long task while
    the others idle.
    """
    by_key: dict[Any, list[tuple]] = {}
    for position, member in enumerate(members):
        key = batch_key(member[2]) if batch_max > 1 else None
        by_key.setdefault(key if key is not None else ("alone", position), []).append(member)
    groups = []
    for same in by_key.values():
        share = math.ceil(free * len(same) / len(members))
        parts = min(len(same), max(math.ceil(len(same) / batch_max), share))
        groups += [same[i::parts] for i in range(parts)]
    return sorted(groups, key=lambda group: -task_cost([config for _, _, config in group]))
