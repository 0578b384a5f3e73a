"""A study's runs written to the MLflow store by writer processes beside its driver.

MLflow's client spends ~50 ms of CPU on a tiny trial's run (create it, one batch of params,
metrics and tags, end it): written by the driver, that caps a study at ~20 trials a second on one
core, whatever the cluster. ``Writers`` hands the workers' journal flushes
(pipeline/record/journal.py) to ``study.writers`` processes (``python -m
pipeline.record.writers FD``), each applying them with its own ``journal.Replay``. A run's flushes
all go to one writer, chosen by its journal key, so each run is written once and in order. A
writer takes its whole backlog at once: the short trials' runs in it, each whole in one flush, go
to a database store in one transaction (pipeline/record/tables.py, ~3 ms of CPU a run instead of
~30 through MLflow's client).

Every message is plain data over a socket pair (``multiprocessing.connection``):

    driver -> writer    ("write", key, ops) | ("end_open", keys, reason) | ("tag", keys, tags)
                        | ("forget", keys) | ("sync", token) | ("close",)
    writer -> driver    ("opened", key, run_id) | ("ended", key, run_id) | ("synced", token)
                        | ("failed", traceback)

The driver learns a run's id and that it ended from these answers, and tells Optuna a trial only
once its runs have ended in the store (pipeline/study/loop.py): Optuna's count never runs ahead of
MLflow's. A writer reads its socket in a thread of its own, so the driver never blocks on a writer
busy in the store, and the writer's answers wait for the driver's next poll. A writer whose driver
vanishes (its socket closes) ends its open runs FAILED. ``processes=0`` applies the same messages
in the driver itself, for a small study not worth a writer's start-up (~2 CPU-seconds of imports).
"""

from __future__ import annotations

import collections
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import traceback
import zlib
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from pipeline.config import TrackingConfig

WRITER_MODULE = "pipeline.record.writers"
CLOSE_TIMEOUT_S = 60.0
BATCH_MAX = 256  # messages a writer takes from its backlog at once
_ROOT = Path(__file__).resolve().parents[2]  # where ``pipeline`` can be imported from


class WriterFailed(RuntimeError):
    """A writer could not write to the store (its traceback), or exited."""


def handle(replay, message: tuple) -> list[tuple]:
    """Apply one message to ``replay`` (a ``journal.Replay``); the answers it calls for."""
    return handle_all(replay, [message])


def handle_all(replay, messages: list[tuple]) -> list[tuple]:
    """``handle`` over ``messages`` in order, each run of consecutive writes applied together
    (whole runs in one transaction: pipeline/record/tables.py)."""
    answers: list[tuple] = []
    writes: list[tuple] = []
    for message in messages:
        if message[0] == "write":
            writes.append(message)
            continue
        answers += _write_all(replay, writes)
        writes = []
        answers += _handle_other(replay, message)
    return answers + _write_all(replay, writes)


def _handle_other(replay, message: tuple) -> list[tuple]:
    kind = message[0]
    if kind == "end_open":
        keys, reason = message[1], message[2]
        return [("ended", key, replay.run_id(key)) for key in replay.end_open(keys, reason)]
    if kind == "tag":
        replay.tag(message[1], message[2])
    elif kind == "forget":
        replay.forget(message[1])
    elif kind == "sync":
        return [("synced", message[1])]
    return []


def _write_all(replay, writes: list[tuple]) -> list[tuple]:
    if not writes:
        return []
    replay.apply_many([(key, ops) for _, key, ops in writes])
    answers = []
    for _, key, ops in writes:
        if ops and ops[0][0] == "open":
            answers.append(("opened", key, replay.run_id(key)))
        if replay.ended(key):
            answers.append(("ended", key, replay.run_id(key)))
    return answers


class _Inline:
    """The messages applied in this process, at once (``study.writers=0``)."""

    def __init__(self, tracking_cfg: TrackingConfig) -> None:
        from pipeline.record.journal import Replay

        self.replay = Replay(tracking_cfg)
        self.answers: collections.deque = collections.deque()

    def send(self, message: tuple) -> None:
        self.answers.extend(handle(self.replay, message))

    def receive(self) -> list[tuple]:
        answers, self.answers = list(self.answers), collections.deque()
        return answers

    def close(self) -> None:
        self.replay.end_open(list(self.replay.runs), "the study stopped")


class _Process:
    """One writer process and the driver's end of its socket."""

    def __init__(self, tracking_cfg: TrackingConfig, index: int) -> None:
        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen(
            [sys.executable, "-m", WRITER_MODULE, str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            env=env,
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self.index = index
        self.connection = Connection(ours.detach())
        self.connection.send(("hello", tracking_cfg))

    def send(self, message: tuple) -> None:
        try:
            self.connection.send(message)
        except OSError as err:
            raise self._exited(err) from err

    def receive(self) -> list[tuple]:
        answers = []
        try:
            while self.connection.poll():
                answers.append(self.connection.recv())
        except (EOFError, OSError) as err:
            raise self._exited(err) from err
        for answer in answers:
            if answer[0] == "failed":
                raise WriterFailed(f"MLflow writer {self.index} failed:\n{answer[1]}")
        return answers

    def _exited(self, err: BaseException) -> WriterFailed:
        code = self.process.poll()
        return WriterFailed(f"MLflow writer {self.index} (pid {self.process.pid}) exited (code {code}): {err}")

    def close(self) -> None:
        """Let it write what it was sent, then exit; killed if it will not."""
        try:
            self.connection.send(("close",))
            self.process.wait(CLOSE_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        finally:
            self.connection.close()


class Writers:
    """The driver's handle on its writers: where each run's flushes go, and what came back."""

    def __init__(self, tracking_cfg: TrackingConfig, processes: int) -> None:
        self.channels: list[Any] = (
            [_Process(tracking_cfg, i) for i in range(processes)] if processes > 0 else [_Inline(tracking_cfg)]
        )
        self.run_ids: dict[str, str] = {}  # journal key -> MLflow run id, once opened
        self.ended: set[str] = set()  # keys whose runs have ended in the store
        self._syncs = 0

    def write(self, key: str, ops: list) -> None:
        self._channel(key).send(("write", key, ops))

    def end_open(self, keys: list[str], reason: str) -> None:
        """End FAILED, with ``reason``, those of ``keys``' runs still open."""
        for channel, mine in self._by_channel(keys):
            channel.send(("end_open", mine, reason))

    def tag(self, keys: list[str], tags: dict[str, Any]) -> None:
        for channel, mine in self._by_channel(keys):
            channel.send(("tag", mine, tags))

    def forget(self, keys: list[str]) -> None:
        """Drop finished runs, here and in their writers: a long study must not keep every run."""
        for channel, mine in self._by_channel(keys):
            channel.send(("forget", mine))
        for key in keys:
            self.run_ids.pop(key, None)
            self.ended.discard(key)

    def poll(self, timeout_s: float = 0.0) -> int:
        """Take in what the writers answered (waiting up to ``timeout_s`` for a first answer)."""
        processes = [c.connection for c in self.channels if isinstance(c, _Process)]  # none: answers are at hand
        if timeout_s > 0 and processes:
            wait(processes, timeout_s)
        answers = [answer for channel in self.channels for answer in channel.receive()]
        for answer in answers:
            self._take(answer)
        return len(answers)

    def sync(self) -> None:
        """Wait until every writer has applied everything sent to it so far."""
        self._syncs += 1
        token = self._syncs
        for channel in self.channels:
            channel.send(("sync", token))
        waiting = set(range(len(self.channels)))
        while waiting:
            for index in list(waiting):
                answers = self.channels[index].receive()
                for answer in answers:
                    self._take(answer)
                if ("synced", token) in answers:
                    waiting.discard(index)
            if waiting:
                wait([self.channels[i].connection for i in waiting], 1.0)

    def close(self) -> None:
        for channel in self.channels:
            channel.close()

    def _take(self, answer: tuple) -> None:
        if answer[0] == "opened":
            self.run_ids[answer[1]] = answer[2]
        elif answer[0] == "ended":
            self.run_ids[answer[1]] = answer[2]
            self.ended.add(answer[1])

    def _channel(self, key: str):
        return self.channels[zlib.crc32(key.encode()) % len(self.channels)]

    def _by_channel(self, keys: list[str]) -> list[tuple[Any, list[str]]]:
        grouped: dict[int, list[str]] = {}
        for key in keys:
            grouped.setdefault(zlib.crc32(key.encode()) % len(self.channels), []).append(key)
        return [(self.channels[index], mine) for index, mine in grouped.items()]


def _serve(connection: Connection) -> None:
    """A writer's life: messages in order until ``close`` or its driver's end."""
    inbox: queue.Queue = queue.Queue()
    threading.Thread(target=_read, args=(connection, inbox), daemon=True).start()
    tracking_cfg = inbox.get()[1]  # "hello": sent first
    from pipeline.record.journal import Replay  # MLflow: imported while the first messages queue

    replay = Replay(tracking_cfg)
    while True:
        messages = _waiting(inbox)
        last = messages[-1]
        stopping = last is None or last[0] == "close"
        try:
            answers = handle_all(replay, messages[:-1] if stopping else messages)
        except Exception:
            _send_all(connection, [("failed", traceback.format_exc())])
            raise
        _send_all(connection, answers)
        if last is None:  # the driver is gone: no run stays RUNNING
            replay.end_open(list(replay.runs), "the study's driver stopped")
        if stopping:
            return


def _waiting(inbox: queue.Queue) -> list:
    """The next message (waiting for it) and those queued behind it, up to ``BATCH_MAX`` or a
    ``close`` (or the driver's end, None), which comes last: a busy writer's backlog is written in
    a few transactions, not one each."""
    messages = [inbox.get()]
    while len(messages) < BATCH_MAX and messages[-1] is not None and messages[-1][0] != "close":
        try:
            messages.append(inbox.get_nowait())
        except queue.Empty:
            break
    return messages


def _send_all(connection: Connection, answers: list[tuple]) -> None:
    try:
        for answer in answers:
            connection.send(answer)
    except OSError:  # the driver is gone; its end (None) is next in the inbox
        pass


def _read(connection: Connection, inbox: queue.Queue) -> None:
    try:
        while True:
            inbox.put(connection.recv())
    except (EOFError, OSError):
        inbox.put(None)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle: it ends the runs
    _serve(Connection(int(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
