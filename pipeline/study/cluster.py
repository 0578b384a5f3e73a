"""Everything Ray: the only module that imports it (its API moves between releases).

Ray owns placement and resources. A study's trials are Ray generator tasks (``num_cpus`` and
``num_gpus`` per trial, fractions allowed) that stream their record to the driver; pruning
questions go to a small actor pinned to the driver's node, which holds the Optuna study (Optuna
owns pruning decisions and trial states). We use Ray core rather than Ray Tune: see README "Design".
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, Optional

import ray

from pipeline.config import ClusterConfig, ConfigError, one_line

_started_here = False
#: (module, attribute): Ray's private APIs used here, each for a reason given where it is used; a
#: test (tests/test_private_apis.py) fails loudly if an upgrade removes one.
PRIVATE_RAY_APIS = (
    ("ray._private.ray_constants", "PROCESS_TYPE_MONITOR"),  # _stop_monitor: which process to kill
    ("ray._private.worker", "_global_node"),  # _stop_monitor: the local instance's processes
    ("ray._private.authentication.authentication_token_setup", "logger"),  # _quiet_token_notice
    ("ray._private.ray_constants", "ENABLE_RAY_CLUSTER"),  # _loopback_only
    ("ray._private.ray_constants", "ENABLE_RAY_CLUSTERS_ENV_VAR"),  # _loopback_only
    ("ray._private.ray_constants", "IS_WINDOWS_OR_OSX"),  # _loopback_only
    ("ray._private.ray_constants", "env_bool"),  # _loopback_only
)
TOKEN_NOTICE_LOGGER = PRIVATE_RAY_APIS[2][0]
CONNECT_TIMEOUT_S = 5.0  # how long a cluster's head may take to answer a first connection
DIED = "worker died"  # how a task's failure reason starts when its worker (or node) died


def start(cfg: ClusterConfig) -> dict[str, float]:
    """Start a local Ray instance (``address`` null) or join a cluster; return its total resources.

    If this process is already connected to Ray (a notebook, a test session), that connection is
    used as it is, and ``shutdown`` leaves it alone.
    """
    global _started_here
    if not ray.is_initialized():
        _check_reachable(cfg.address)
        on_sigterm = signal.getsignal(signal.SIGTERM)
        try:
            ray.init(**_init_args(cfg))
        except ConnectionError as err:
            raise ConfigError(f"cluster.address={cfg.address}: cannot reach a Ray cluster ({err})") from err
        _keep_python_handler(signal.SIGTERM, on_sigterm)
        _started_here = True
        if not cfg.address:
            _start_reaper()
    return ray.cluster_resources()


def _keep_python_handler(signum: int, handler) -> None:
    """Put back the handler the command had: Ray's core installs its own for SIGTERM, which aborts
    the process (no run ended, no study record closed) where the command stops cleanly."""
    if callable(handler) and threading.current_thread() is threading.main_thread():
        signal.signal(signum, handler)


def _check_reachable(address: Optional[str], timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """A ``host:port`` that does not answer fails now, in one line: Ray would retry for minutes."""
    host, _, port = (address or "").rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return  # the local instance, "auto", or a ray:// client address: Ray's own checks
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ConfigError(
            f"cluster.address={address} is unreachable within {timeout_s:g} s ({err}); start its head with "
            "`ray start --head` or use cluster.address=auto (a running cluster) or null (a local instance)"
        ) from err


def _init_args(cfg: ClusterConfig) -> dict[str, Any]:
    common = {"logging_level": "WARNING", "log_to_driver": True, "configure_logging": True}
    _loopback_only(not cfg.address)
    if cfg.address:
        return {"address": cfg.address, **common}
    _quiet_token_notice()
    # Local workers inherit the driver's environment: make sure they find this package and conf/
    # (cheaper than a runtime_env, which costs an agent round-trip at start-up).
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_project_root(), os.environ.get("PYTHONPATH")]))
    # "local": always a new instance of our own, never one that a `ray start` on this machine left
    # (its address file would otherwise be joined, or refuse num_cpus); cluster.address=auto joins one.
    return {"address": "local", "num_cpus": cfg.num_cpus or os.cpu_count(), "include_dashboard": False, **common}


def _loopback_only(local: bool) -> None:
    """Make a local instance listen on 127.0.0.1 alone, not on every interface (``local``), or
    undo that for a cluster, whose nodes must reach each other.

    Ray binds its servers (GCS, raylet, workers, agents) to the node's IP, and takes a reachable
    interface's address for it unless clusters are "disabled" (its own setting for macOS and
    Windows, where the node IP is then the loopback address); ``ray.init`` has no bind address.
    A local instance is one node: nothing outside this host needs to reach it. Set in this
    process (read when Ray resolves the node IP) and in the environment its processes inherit.
    """
    from ray._private import ray_constants

    if local:
        os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    elif os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR) == "0":
        del os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR]
    default = not ray_constants.IS_WINDOWS_OR_OSX  # Ray's own default, which the environment may change
    ray_constants.ENABLE_RAY_CLUSTER = not local and ray_constants.env_bool(
        ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, default
    )


TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster"


class _DropTokenNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(TOKEN_NOTICE)


def _quiet_token_notice() -> None:
    """Ray (2.60) turns token authentication on for a local instance and says so as a WARNING at
    every start: noise on every study's stderr for an instance that lives and dies with the
    command. Authentication stays on; only that notice is dropped (setting RAY_AUTH_MODE would
    silence it too, but Ray reads it once, when it is imported)."""
    notices = logging.getLogger(TOKEN_NOTICE_LOGGER)
    if not any(isinstance(f, _DropTokenNotice) for f in notices.filters):
        notices.addFilter(_DropTokenNotice())


def _project_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@contextlib.contextmanager
def session(cfg: ClusterConfig) -> Iterator[dict[str, float]]:
    """``start`` ... ``shutdown``, whatever happens in between."""
    try:
        yield start(cfg)
    finally:
        shutdown()


def shutdown() -> None:
    """Disconnect, if ``start`` connected (a local instance started by ``start`` then stops)."""
    global _started_here
    if _started_here and ray.is_initialized():
        _stop_monitor()
        ray.shutdown()
    _started_here = False
    _stop_reaper()


_reaper: Optional[subprocess.Popen] = None


def _start_reaper() -> None:
    """A watchdog that kills the local instance's processes if this driver dies without shutting
    it down (pipeline/study/reaper.py)."""
    global _reaper
    if _reaper is not None and _reaper.poll() is None:
        return  # one watchdog covers every descendant of this process
    command = [sys.executable, "-m", "pipeline.study.reaper", str(os.getpid())]
    _reaper = subprocess.Popen(command, stdin=subprocess.DEVNULL)  # PYTHONPATH: set by _init_args


def _stop_reaper() -> None:
    global _reaper
    if _reaper is not None:
        _reaper.kill()
        _reaper.wait()
        _reaper = None


def _stop_monitor() -> None:
    """Kill the local instance's autoscaler monitor at once.

    ``ray.shutdown`` stops Ray's processes one after another, each given a second to exit on
    SIGTERM; the monitor (an autoscaler, with nothing to scale or save on a local instance) always
    uses all of it: 1.0 of the 1.1 s. Others are left to ``ray.shutdown``, in its order.
    """
    try:
        from ray._private import ray_constants
        from ray._private.worker import _global_node

        for info in _global_node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []) if _global_node else []:
            info.process.kill()
            info.process.wait(timeout=1)
    except Exception:  # Ray's internals moved: ray.shutdown stops it, slowly
        pass


def concurrency(cfg: ClusterConfig, resources: dict[str, float]) -> int:
    """How many trials fit at once: the cluster's CPUs (and GPUs) over what one trial asks for."""
    limits = [math.floor(resources.get("CPU", 1) / cfg.cpus_per_trial)] if cfg.cpus_per_trial > 0 else []
    if cfg.gpus_per_trial > 0:
        gpus = resources.get("GPU", 0)
        if gpus < cfg.gpus_per_trial:
            raise ConfigError(f"cluster.gpus_per_trial={cfg.gpus_per_trial} but the cluster has {gpus} GPUs")
        limits.append(math.floor(gpus / cfg.gpus_per_trial + 1e-9))
    fit = max(1, min(limits) if limits else 1)
    return min(fit, cfg.max_concurrent) if cfg.max_concurrent else fit


def submit(fn: Callable, payload: dict, cfg: ClusterConfig):
    """Run the generator ``fn(payload)`` as a Ray task with the trial's resources; returns a
    stream of its items (``next_item``), which ``wait`` accepts.

    Ray does not retry it: a retried generator's items would be taken for the first attempt's
    (Ray skips those it has already seen), so the driver retries a task whose worker died.
    """
    return _with_resources(fn, cfg.cpus_per_trial, cfg.gpus_per_trial).remote(payload)


@functools.cache
def _remote(fn: Callable):
    """``fn`` as a Ray remote function, made once: Ray pickles and exports a new one (~3 ms) on its
    first call in each session."""
    return ray.remote(fn)


@functools.lru_cache(maxsize=64)
def _with_resources(fn: Callable, cpus: float, gpus: float):
    """``_remote(fn)`` with a task's resources, made once per resources: each ``options`` call
    builds a wrapper class that Ray keeps (~150 bytes a task, for the driver's whole life)."""
    return _remote(fn).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)


def next_item(stream) -> tuple[Optional[dict], Optional[str], bool]:
    """A ready stream's next item: ``(item, None, False)``; ``(None, reason, died)`` if the task
    raised (``died``: its worker or node died); ``(None, None, False)`` if
    the stream has ended."""
    try:
        ref = next(stream)
    except StopIteration:
        return None, None, False
    value, reason = result(ref)
    died = reason is not None and reason.startswith(DIED)
    return value, reason, died


def warm_up(fn: Callable, slots: int, cfg: ClusterConfig, *args: Any) -> list:
    """Start ``slots`` worker processes now, running ``fn(*args)`` (heavy imports), while the driver sets up."""
    remote = ray.remote(fn).options(num_cpus=cfg.cpus_per_trial, num_gpus=cfg.gpus_per_trial)
    return [remote.remote(*args) for _ in range(slots)]


def wait(refs: list, timeout_s: float) -> tuple[list, list]:
    return ray.wait(refs, num_returns=1, timeout=timeout_s)


def result(ref) -> tuple[Optional[dict], Optional[str]]:
    """``(value, None)``, or ``(None, reason)`` if the task raised or its worker died for good."""
    try:
        return ray.get(ref), None
    except ray.exceptions.RayTaskError as err:
        return None, one_line(err.cause if err.cause else err, 2000)
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError) as err:
        return None, f"{DIED}: {type(err).__name__}"
    except ray.exceptions.RayError as err:
        return None, f"{type(err).__name__}: {one_line(err, 500)}"


def cancel(refs: list) -> None:
    for ref in refs:
        ray.cancel(ref, force=True)


def settle(streams: list, timeout_s: float) -> None:
    """Wait until every task of ``streams`` has ended (returned, failed or been killed), at most ``timeout_s``."""
    if streams:
        ray.wait([stream.completed() for stream in streams], num_returns=len(streams), timeout=timeout_s)


def worker_context() -> dict[str, Any]:
    """Inside a task: where it runs and which GPUs Ray gave it."""
    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(), "gpu_ids": ray.get_gpu_ids()}


@ray.remote(num_cpus=0)
class _PruningOracle:
    """Answers workers' per-epoch "should this trial stop?" with the Optuna study's pruner."""

    def __init__(self, decide: Callable[[int, int, int, float], bool]) -> None:
        self.decide = decide

    def report(self, trial_id: int, seed_index: int, step: int, value: float) -> bool:
        return self.decide(trial_id, seed_index, step, value)


def start_oracle(decide: Callable[[int, int, int, float], bool]):
    """An actor on the driver's node (so a sqlite study storage on that node is reachable)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    strategy = NodeAffinitySchedulingStrategy(node_id=here, soft=False)
    return _PruningOracle.options(scheduling_strategy=strategy).remote(decide)


def ask_oracle(oracle, trial_id: int, seed_index: int, step: int, value: float) -> bool:
    return ray.get(oracle.report.remote(trial_id, seed_index, step, value))
