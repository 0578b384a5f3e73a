"""Leave no process of a local Ray instance behind when its driver dies, however it dies.

``ray.shutdown`` stops a local instance, but a driver killed with ``kill -9`` (or by the kernel's
OOM killer) never runs it: Ray's GCS and raylet stop, and their agents (dashboard agent, runtime
env agent) live on as orphans, listening on every interface. ``cluster.start`` therefore starts
this watchdog beside a local instance: ``python -m pipeline.study.reaper DRIVER_PID``. It notes the
driver's descendants every ``POLL_S`` and, once the driver is gone (it is then no longer this
process's parent), kills those still alive. ``cluster.shutdown`` stops it after a clean shutdown.
Linux only (it reads /proc); elsewhere it exits at once.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

POLL_S = 0.5


def process_stat(pid: int) -> Optional[tuple[int, str]]:
    """``(parent pid, start time)`` of a live process, from /proc/PID/stat; None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ..., starttime
    return (int(fields[1]), fields[19]) if fields[0] != "Z" else None


def descendants(root: int) -> dict[int, str]:
    """Every live descendant of ``root``: pid -> start time (which tells a reused pid apart)."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        stat = process_stat(int(entry.name)) if entry.name.isdigit() else None
        if stat is not None:
            children.setdefault(stat[0], []).append((int(entry.name), stat[1]))
    found, stack = {}, [root]
    while stack:
        for pid, start in children.get(stack.pop(), []):
            found[pid] = start
            stack.append(pid)
    return found


def watch(driver: int) -> None:
    """Note ``driver``'s descendants until it dies, then kill the ones that outlived it."""
    known: dict[int, str] = {}
    while os.getppid() == driver:
        known.update(descendants(driver))
        known.pop(os.getpid(), None)
        time.sleep(POLL_S)
    for pid, start in known.items():
        stat = process_stat(pid)
        if stat is not None and stat[1] == start:
            os.kill(pid, signal.SIGKILL)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the terminal is the driver's to handle
    if Path("/proc/self/stat").exists():
        watch(int(sys.argv[1]))


if __name__ == "__main__":
    main()
