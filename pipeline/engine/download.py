"""The file datasets (mnist, fashion_mnist, cifar10, cifar100, svhn): where they live, and their download.

This module imports no PyTorch: the study driver calls ``ensure_dataset`` on the head node before
Ray starts, and ``trial`` calls it before its MLflow run opens, so an offline machine fails in one
line before any run. The loaders in data.py call ``dataset_files``, so a worker on another node
fetches the files itself the first time it needs them.

Where: ``dataset.root``; when null ``$INITSTUDY_DATA/<name>``, else ``~/.cache/initstudy/<name>``.
Files already there in a known layout (torchvision's ``MNIST/raw/`` included) are read as they are.

The mirrors and md5 checksums are torchvision's (and the CIFAR page's for the binary archives), but
not its code: PyPI's torchvision fails to import beside the pinned CPU torch 2.13.0 (it needs the
matching multi-GB CUDA build), and its dataset classes import torch, which the driver must not.

- Every file is checked against its published md5; a file that does not match is removed.
- Nothing half-written is ever read: a download goes to a temporary file in the same folder, is
  fsynced and verified, then renamed into place; an archive is extracted into a temporary folder
  that is renamed into place. The next download removes what a killed one left.
- Once per node: the download holds an fcntl lock on ``<folder>/.download.lock``; another process
  that needs the same files waits, then finds them.
- Mirrors are tried in order, ``$INITSTUDY_DATASET_MIRROR`` first (a base URL serving the canonical
  file names: a proxy, a local copy), each with a 30 s connect and read timeout. When all fail:
  one ``ConfigError`` line with the URLs tried, why, and where to put the files by hand.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Optional

from pipeline.config import ConfigError, DatasetConfig, one_line
from pipeline.config.catalog import DATASETS

#: Where the file datasets live when ``dataset.root`` is null and $INITSTUDY_DATA is unset: ``<this>/<name>``.
DEFAULT_ROOT = "~/.cache/initstudy"
DATA_ENV = "INITSTUDY_DATA"
MIRROR_ENV = "INITSTUDY_DATASET_MIRROR"
TIMEOUT_S = 30.0  # connect, and each read: a stalled mirror fails over instead of hanging a study
LOCK_FILE = ".download.lock"
_CHUNK = 1 << 20
_USER_AGENT = "initstudy (dataset download)"


@dataclass(frozen=True)
class Resource:
    """One file as the mirrors serve it. ``folder``: it is a tar.gz archive whose ``folder/`` is
    extracted under the dataset's directory; None: the file is kept as it is."""

    name: str
    md5: str
    folder: Optional[str] = None

    @property
    def target(self) -> str:
        """What it becomes under the dataset's directory: its presence means it was verified."""
        return self.folder or self.name


@dataclass(frozen=True)
class FileDataset:
    """The files a reader needs, the layouts looked in for them, and where they come from."""

    files: tuple[str, ...]  # each may also be found gzipped (``<name>.gz``)
    layouts: tuple[str, ...]  # sub-directories of the dataset's directory, "" = itself
    mirrors: tuple[str, ...]  # base URLs, tried in order
    resources: tuple[Resource, ...]  # what a download fetches (into layout "" or a resource's folder)
    by_hand: str  # how a person gets them without us


_IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR10_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6)) + ("test_batch.bin",)
_TORONTO = ("https://www.cs.toronto.edu/~kriz/",)


def _gzipped_idx(md5s: tuple[str, ...]) -> tuple[Resource, ...]:
    return tuple(Resource(f"{name}.gz", md5) for name, md5 in zip(_IDX, md5s))


FILE_DATASETS: dict[str, FileDataset] = {
    "mnist": FileDataset(
        _IDX,
        ("", "mnist", "MNIST/raw"),
        (
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        _gzipped_idx(
            (
                "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "d53e105ee54ea40749a09fcbcd1e9432",
                "9fb629c4189551a2d022fa330f9573f3",
                "ec29112dd5afa0611ce80d1b7f02629c",
            )
        ),
        "get the four .gz files from https://yann.lecun.com/exdb/mnist/ (or a mirror) or copy torchvision's MNIST/raw",
    ),
    "fashion_mnist": FileDataset(
        _IDX,
        ("", "fashion_mnist", "FashionMNIST/raw"),
        (
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
        _gzipped_idx(
            (
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "25c81989df183df01b3e8a0aad5dffbe",
                "bef4ecab320f06d8554ea6380940ec79",
                "bb300cfdad3c16e7a12a480ee83cd310",
            )
        ),
        "get the four .gz files from https://github.com/zalandoresearch/fashion-mnist (data/fashion) or copy "
        "torchvision's FashionMNIST/raw",
    ),
    "cifar10": FileDataset(
        CIFAR10_FILES,
        ("", "cifar-10-batches-bin", "cifar10", "cifar10/cifar-10-batches-bin"),
        _TORONTO,
        (Resource("cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530", "cifar-10-batches-bin"),),
        "get the BINARY version cifar-10-binary.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract "
        "it (torchvision's cifar-10-batches-py pickles are not read)",
    ),
    "cifar100": FileDataset(
        ("train.bin", "test.bin"),
        ("", "cifar-100-binary", "cifar100", "cifar100/cifar-100-binary"),
        _TORONTO,
        (Resource("cifar-100-binary.tar.gz", "03b5dce01913d631647c71ecec9e9cb8", "cifar-100-binary"),),
        "get the BINARY version cifar-100-binary.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and "
        "extract it (torchvision's cifar-100-python pickles are not read)",
    ),
    "svhn": FileDataset(
        ("train_32x32.mat", "test_32x32.mat"),
        ("", "svhn"),
        ("http://ufldl.stanford.edu/housenumbers/",),
        (
            Resource("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
            Resource("test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3"),
        ),
        "get train_32x32.mat and test_32x32.mat (format 2, cropped digits) from http://ufldl.stanford.edu/housenumbers/",
    ),
}


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def ensure_dataset(cfg: DatasetConfig) -> None:
    """Make sure this node has ``cfg``'s files (downloading them if missing and ``cfg.download``).

    The embedded datasets (digits, mnist1d, synthetic) need nothing.

    Raises:
        ConfigError: one line: an unknown name, files missing with ``download=false``, every mirror
            failing (offline), a checksum mismatch, or a directory that cannot be written.
    """
    name = DATASETS.canonical(cfg.name)
    if name in FILE_DATASETS:
        dataset_files(name, cfg.root, cfg.download)


def dataset_dir(name: str, root: Optional[str]) -> Path:
    """The directory of a file dataset: ``root``, else ``$INITSTUDY_DATA/<name>``, else the default cache."""
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get(DATA_ENV) or DEFAULT_ROOT).expanduser() / name


def dataset_files(name: str, root: Optional[str], download: bool = True) -> dict[str, Path]:
    """{file name: path} of a file dataset's files (plain or .gz), downloaded first if they are missing.

    Args:
        name: a canonical name of ``FILE_DATASETS``.
        root: ``dataset.root`` (None: the cache, see ``dataset_dir``).
        download: fetch missing files (False: only look, as ``dataset.download=false``).
    """
    source, base = FILE_DATASETS[name], dataset_dir(name, root)
    found = find_files(source, base)
    if found is None and download:
        with _node_lock(name, base):
            if find_files(source, base) is None:  # not fetched by a process this one waited for
                _fetch(name, source, base)
        found = find_files(source, base)
    if found is None:
        raise _missing(name, source, base, download)
    return found


def find_files(source: FileDataset, base: Path) -> Optional[dict[str, Path]]:
    """{file name: path} from the first layout under ``base`` that holds every file, or None."""
    for layout in source.layouts:
        found = _files_in(base / layout, source.files)
        if found is not None:
            return found
    return None


def _files_in(directory: Path, names: tuple[str, ...]) -> Optional[dict[str, Path]]:
    found = {}
    for name in names:
        path = next((p for p in (directory / name, directory / f"{name}.gz") if p.is_file()), None)
        if path is None:
            return None
        found[name] = path
    return found


def _missing(name: str, source: FileDataset, base: Path, download: bool) -> ConfigError:
    others = ", ".join(str(base / layout) for layout in source.layouts if layout)
    why = "a download left them incomplete: remove the folder and run again" if download else "nothing is downloaded"
    return ConfigError(
        f"dataset={name}: expected {', '.join(source.files)} (each may end in .gz) in {base} (or in {others}); "
        f"they are not there and {why} (dataset.download={str(download).lower()}): {source.by_hand}, "
        f"then put them in {base} or pass dataset.root=DIR"
    )


# ---------------------------------------------------------------------------------------------
# Download: lock, mirrors, verified temporary files, atomic install
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _node_lock(name: str, base: Path) -> Iterator[None]:
    """Held while downloading into ``base``: one process per node downloads, the others wait for it."""
    try:
        base.mkdir(parents=True, exist_ok=True)
        handle = open(base / LOCK_FILE, "a")
    except OSError as err:
        raise ConfigError(
            f"dataset={name}: cannot write to {base} ({one_line(err)}); pass dataset.root=DIR with a folder "
            f"you can write, or set {DATA_ENV}"
        ) from err
    with handle:  # closing the file releases the lock, also when the process dies
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"dataset={name}: another process is downloading into {base}; waiting for it", file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _fetch(name: str, source: FileDataset, base: Path) -> None:
    """Download and install every resource not yet in ``base`` (one a past run installed is kept)."""
    _remove_leftovers(base)
    for resource in source.resources:
        if not (base / resource.target).exists():
            _fetch_one(name, source, resource, base)


def _remove_leftovers(base: Path) -> None:
    """The temporary files and folders of a process killed while downloading: under the lock no
    other process is writing them, and nothing ever reads them."""
    for path in base.glob(".*.part"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _fetch_one(name: str, source: FileDataset, resource: Resource, base: Path) -> None:
    failures = []
    for url in mirror_urls(source, resource):
        try:
            part = _download(url, base, resource)
        except (OSError, http.client.HTTPException, ValueError) as err:  # URLError, timeouts, bad md5 or URL
            failures.append(f"{url} ({_reason(err)})")
            continue
        _install(name, part, base, resource)
        return
    raise ConfigError(
        f"dataset={name}: could not download {resource.name}; tried {'; '.join(failures) or 'no mirror'}. "
        f"Without a network, {source.by_hand}, and put them in {base} (or pass dataset.root=DIR); "
        f"behind a proxy, set https_proxy, or {MIRROR_ENV}=URL of a folder serving {resource.name}"
    )


def _reason(err: Exception) -> str:
    """Why a URL failed, without urllib's ``<urlopen error ...>`` wrapping (an HTTPError says its status)."""
    return one_line(err.reason if type(err) is urllib.error.URLError else err, 300)


def mirror_urls(source: FileDataset, resource: Resource) -> list[str]:
    """The URLs of ``resource``, in the order they are tried: $INITSTUDY_DATASET_MIRROR first."""
    mirrors = [os.environ[MIRROR_ENV]] if os.environ.get(MIRROR_ENV) else []
    return [f"{mirror.rstrip('/')}/{resource.name}" for mirror in mirrors + list(source.mirrors)]


class ChecksumError(ValueError):
    """A downloaded file whose md5 is not the published one (it was removed)."""


def _download(url: str, base: Path, resource: Resource) -> Path:
    """``url`` into a temporary file in ``base``, fsynced and checked against its md5; removed on any failure."""
    handle = tempfile.NamedTemporaryFile(dir=base, prefix=f".{resource.name}.", suffix=".part", delete=False)
    part = Path(handle.name)
    try:
        with handle:
            digest = _copy(url, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if digest != resource.md5:
            raise ChecksumError(f"{resource.name} has md5 {digest}, expected {resource.md5}; the file was removed")
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return part


def _copy(url: str, out: IO[bytes]) -> str:
    """Write ``url``'s body to ``out`` and return its md5. A body shorter than its Content-Length
    raises: http.client returns a dropped connection's partial body as if it were complete."""
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    digest, size = hashlib.md5(usedforsecurity=False), 0
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        length = response.headers.get("Content-Length")
        # Said once a mirror answers: an offline machine's error stays the one line of its ConfigError.
        print(f"downloading {url}" + (f" ({int(length) / 1e6:.1f} MB)" if length else ""), file=sys.stderr)
        while chunk := response.read(_CHUNK):
            out.write(chunk)
            digest.update(chunk)
            size += len(chunk)
    if length is not None and size != int(length):
        raise ConnectionError(f"the connection closed after {size} of {length} bytes")
    return digest.hexdigest()


def _install(name: str, part: Path, base: Path, resource: Resource) -> None:
    """A verified download into place: renamed to its name, or (an archive) extracted and removed."""
    try:
        if resource.folder is None:
            os.chmod(part, 0o644)  # a temporary file is private; downloaded data is not
            os.replace(part, base / resource.name)
        else:
            _extract(part, base, resource.folder)
        _fsync_dir(base)  # the rename itself survives a crash
    except (OSError, tarfile.TarError, EOFError) as err:
        raise ConfigError(f"dataset={name}: cannot install {resource.name} into {base}: {one_line(err, 300)}") from err
    finally:
        part.unlink(missing_ok=True)


def _extract(archive: Path, base: Path, folder: str) -> None:
    """The regular files directly in ``folder/`` of a tar.gz into ``base/folder``, through a
    temporary folder renamed into place. Nothing else is written: no link, no path outside it."""
    staging = Path(tempfile.mkdtemp(dir=base, prefix=f".{folder}.", suffix=".part"))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                parts = [p for p in PurePosixPath(member.name).parts if p != "."]
                if member.isfile() and len(parts) == 2 and parts[0] == folder and parts[1] != "..":
                    _write_member(tar, member, staging / parts[1])
        os.chmod(staging, 0o755)
        os.replace(staging, base / folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> None:
    with tar.extractfile(member) as source, open(path, "wb") as out:
        shutil.copyfileobj(source, out, _CHUNK)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(path, 0o644)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
