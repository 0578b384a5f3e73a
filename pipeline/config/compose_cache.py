"""Hydra's compositions, kept on disk between commands.

A composition costs Hydra ~0.1-0.2 s (mostly OmegaConf deep copies and merges), and a study
composes a dozen (its base config and each group choice of its space) while Ray starts, on the
driver's path to its first trials; every ``trial`` and ``run`` command composes again what the last
one did. The composed tree (unresolved: interpolations such as ``${oc.env:...}`` still resolve
later, at each use) is a pure function of the files under ``conf/``, the schemas in
``pipeline/config/schema.py``, the overrides, and the Hydra and OmegaConf versions: all of that is the
key, so an edited YAML file or schema, or an upgrade, is a new key and Hydra composes afresh. A
cached tree is the pickled ``DictConfig`` itself (struct mode and schema types included, so a
later override is checked as Hydra would).

Where: ``$XDG_CACHE_HOME/initstudy/composed`` (default ``~/.cache/initstudy/composed``), at most
``MAX_FILES`` trees (the oldest go first). ``INITSTUDY_COMPOSE_CACHE=off`` turns it off. A cache
that cannot be read or written is skipped silently: Hydra composes, as without it. A composition
that names a Hydra search path (``hydra.searchpath``, in an override or a file of ``conf/``) is
never cached: the files it adds lie outside what the key covers.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import pickle
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

MAX_FILES = 512
SEARCH_PATH = "searchpath"  # Hydra's hydra.searchpath: configs from folders the key does not cover
_SCHEMAS = Path(__file__).resolve().parent / "schema.py"


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/initstudy``, default ``~/.cache/initstudy``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "initstudy")


def enabled() -> bool:
    return os.environ.get("INITSTUDY_COMPOSE_CACHE", "on").lower() not in ("off", "0", "false", "no")


def key(conf_dir: Path, config_name: str, overrides: list[str]) -> Optional[str]:
    """The cache key of one composition (None: the cache is off)."""
    if not enabled() or any(SEARCH_PATH in o for o in overrides):
        return None
    conf_dir = Path(conf_dir).resolve()
    fingerprint = _fingerprint(conf_dir, _stats(conf_dir))
    if fingerprint is None:
        return None
    inputs = [fingerprint, config_name, *overrides]
    return hashlib.sha256("\0".join(inputs).encode()).hexdigest()


def load(cache_key: Optional[str]) -> Optional[Any]:
    """The tree stored under ``cache_key``, or None (none stored, unreadable, or the cache is off)."""
    if cache_key is None:
        return None
    try:
        return pickle.loads(_path(cache_key).read_bytes())
    except Exception:  # missing, truncated by a crash, or from a Python that pickles differently
        return None


def store(cache_key: Optional[str], tree: Any) -> None:
    """Keep ``tree`` under ``cache_key`` (atomically: a concurrent reader sees all of it or none)."""
    if cache_key is None:
        return
    folder, partial = _path(cache_key).parent, None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=folder, prefix=".partial-")
        with os.fdopen(handle, "wb") as out:
            pickle.dump(tree, out)
        os.replace(partial, _path(cache_key))
        _prune(folder)
    except OSError:  # a read-only or full home: compose without the cache
        if partial is not None:
            with contextlib.suppress(OSError):
                os.unlink(partial)


def _path(cache_key: str) -> Path:
    return user_cache_dir() / "composed" / f"{cache_key}.pkl"


def _stats(conf_dir: Path) -> tuple:
    """What identifies the inputs' current contents cheaply: each file's path, size and mtime."""
    files = sorted(p for p in conf_dir.rglob("*") if p.is_file()) + [_SCHEMAS]
    return tuple((str(p), *_size_and_mtime(p)) for p in files)


def _size_and_mtime(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_size, info.st_mtime_ns


@functools.lru_cache(maxsize=8)
def _fingerprint(conf_dir: Path, stats: tuple) -> Optional[str]:
    """A digest of every input file's name and contents and of the versions that compose, computed
    once per set of file stats (a file that changes, changes its stats); None if a file of
    ``conf/`` names a search path. Where ``conf/`` lies is not part of it: two checkouts with the
    same files compose the same trees."""
    digest = hashlib.sha256()
    for path, *_ in stats:
        content = Path(path).read_bytes()
        if path != str(_SCHEMAS) and SEARCH_PATH.encode() in content:
            return None
        name = "schemas" if path == str(_SCHEMAS) else str(Path(path).relative_to(conf_dir))
        digest.update(name.encode() + b"\0" + content + b"\0")
    digest.update(_versions().encode())
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def _versions() -> str:
    found = []
    for package in ("hydra-core", "omegaconf"):
        try:
            found.append(f"{package}={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            found.append(f"{package}=?")
    return ";".join([*found, f"python={sys.version_info.major}.{sys.version_info.minor}"])


def _prune(folder: Path) -> None:
    """At most MAX_FILES trees: past that, the older half goes."""
    entries = list(os.scandir(folder))
    if len(entries) <= MAX_FILES:
        return
    for entry in sorted(entries, key=lambda e: e.stat().st_mtime_ns)[: len(entries) - MAX_FILES // 2]:
        with contextlib.suppress(OSError):  # another process removed it first
            os.unlink(entry.path)
