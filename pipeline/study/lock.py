"""One driver per study: a lock in the study's folder, held for as long as its driver runs.

Two drivers on one study would each take the other's running trials for a dead driver's, tell
Optuna twice and repeat work. The lock is an advisory ``flock`` on ``<study.output_dir>/<name>/
driver.lock``: the kernel releases it when its process ends, however it ends (``kill -9``
included), so a dead driver's lock is taken over by the next one without any clean-up. The file
names its holder (pid, host, start, command) for the message the second driver prints. It guards
drivers that share that folder: one host, or a filesystem whose locks work across hosts.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import IO, Optional

from pipeline.config import ConfigError
from pipeline.config.stores import masked

LOCK_NAME = "driver.lock"


class StudyLock:
    """``with StudyLock(folder, name):`` the body runs as the study's only driver, or raises ``ConfigError``."""

    def __init__(self, folder: Path, study: str) -> None:
        self.path, self.study = Path(folder) / LOCK_NAME, study
        self._handle: Optional[IO[str]] = None

    def __enter__(self) -> StudyLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = self.path.open("a+")  # not inherited by child processes (Ray's), which could outlive us
        except OSError as err:
            raise ConfigError(f"study.output_dir: cannot write {self.path.parent} ({err.strerror or err})") from err
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise ConfigError(self._busy_message()) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(_holder()))
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def _busy_message(self) -> str:
        try:
            holder = json.loads(self.path.read_text())
            who = f"driver pid {holder['pid']} on {holder['host']}, started {holder['started']}"
        except (OSError, ValueError, KeyError):
            who = "another driver"
        return (
            f"study {self.study} is already running ({who}; lock {self.path}); wait for it to end or stop it, "
            "or give this study another study.name"
        )


def _holder() -> dict:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": started, "command": masked(" ".join(sys.argv))}
