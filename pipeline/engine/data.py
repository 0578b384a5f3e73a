"""Datasets as tensors on the trial's device, batched by index.

``DATASETS`` maps a name to a raw loader ``loader(cfg: DatasetConfig) -> RawData``: the samples as
the source gives them (uint8 images stay uint8), with the source's own test split if it has one.
``load_dataset`` then does the same steps for every dataset, in this order:

1. split: a stratified, ``split_seed``-fixed train/val(/test) split of the whole dataset. It comes
   before the class subset on purpose: a sample that is a test sample with all classes is a test
   sample with any subset, so a pretrain-on-all / fine-tune-on-some pair never tests on a sample the
   other run trained on (same ``split_seed`` and fractions).
2. ``classes``: keep those labels in every split, relabelled 0..k-1 in the given order.
3. ``max_train``: keep the first ``max_train`` training samples of a ``split_seed`` permutation, so
   smaller budgets are subsets of larger ones. It is not stratified: a few samples may miss a class.
4. ``input_norm``: statistics fitted on the training split only, applied to all three splits.

``val_fraction`` and ``test_fraction`` are shares of the dataset's whole labelled pool (digits:
all 1797 samples, so 0.2/0.2 gives 1079/359/359); a dataset with its own test split (mnist1d, mnist,
fashion_mnist, cifar10, cifar100, svhn) ignores ``test_fraction`` and carves val from its training set.

digits ships with scikit-learn, mnist1d is generated locally and synthetic is drawn by
scikit-learn. The file datasets (mnist, fashion_mnist, cifar10, cifar100, svhn) are read from their
directory (``dataset.root``, else ``$INITSTUDY_DATA/<name>``, else ``~/.cache/initstudy/<name>``)
and downloaded there, verified, on first use unless ``dataset.download=false``:
pipeline/engine/download.py (no PyTorch, so the study driver fetches them before Ray starts).
Missing files that cannot be fetched are a one-line ``ConfigError`` saying which files to put where.
The raw load is cached per process because a worker runs many trials on the same data.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import io
import math
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from pipeline.config import ConfigError, DatasetConfig, one_line
from pipeline.config.catalog import DATASETS, informative_features
from pipeline.config.catalog import validate_dataset as validate_config
from pipeline.engine.download import CIFAR10_FILES, dataset_files


@dataclass(frozen=True)
class RawData:
    """One dataset as its source gives it, before splitting and normalizing.

    ``x`` is (N, *input_shape) of any numeric dtype, ``y`` (N,) int64 labels in 0..num_classes-1.
    ``x_test``/``y_test`` are the source's own test split, or None when it has none.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    x_test: Optional[np.ndarray] = None
    y_test: Optional[np.ndarray] = None


@dataclass
class Splits:
    """Train/val/test tensors of one dataset: x float32 (N, *input_shape), y int64 (N,)."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    input_shape: tuple[int, ...]

    def to(self, device: str | torch.device) -> Splits:
        """The same splits with every tensor on ``device``."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self) if f.name[:2] in ("x_", "y_")}
        return replace(self, **moved)


#: name -> ``loader(cfg) -> RawData``. A loader reads only the config fields it was registered with
#: (``_dataset(name, uses=...)``): those fields are the key of the per-process raw cache.
# DATASETS (pipeline/config/catalog.py): each declared name is registered below.
_RAW_FIELDS: dict[str, tuple[str, ...]] = {}


def _dataset(name: str, uses: tuple[str, ...] = ()) -> Callable:
    """Register a raw loader that depends on the config fields ``uses`` (and nothing else)."""

    def add(loader: Callable[[DatasetConfig], RawData]) -> Callable[[DatasetConfig], RawData]:
        DATASETS.add(name, loader)
        _RAW_FIELDS[name] = uses
        return loader

    return add


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def load_dataset(cfg: DatasetConfig, device: str | torch.device = "cpu") -> Splits:
    """Load, split, subset and normalize one dataset (see the module docstring for the order).

    Args:
        cfg: the dataset config group.
        device: where the returned tensors live.

    Returns:
        Fresh tensors (never shared with the cache, so callers may move or modify them).

    Raises:
        ConfigError: an unknown name or bad value, missing files, or a split that cannot be made.
    """
    validate_config(cfg)
    raw = _load_raw(cfg)
    # A copy of the cached dict: its parts are replaced below, never written into.
    parts = dict(_cached_split(*_raw_key(cfg), cfg.val_fraction, cfg.test_fraction, cfg.split_seed))
    num_classes = raw.num_classes
    if cfg.classes is not None:
        parts, num_classes = _select_classes(parts, list(cfg.classes), raw.num_classes), len(cfg.classes)
    parts["train"] = _truncate(*parts["train"], cfg.max_train, cfg.split_seed)
    shift, scale = _norm_stats(cfg, parts["train"][0])
    tensors = {}
    for split, (x, y) in parts.items():
        tensors[f"x_{split}"] = torch.from_numpy(_apply_norm(x, shift, scale))
        tensors[f"y_{split}"] = torch.from_numpy(np.array(y, dtype=np.int64))  # a copy: cache stays intact
    return Splits(**tensors, num_classes=num_classes, input_shape=tuple(raw.x.shape[1:])).to(device)


def batch_indices(n: int, batch_size: int, generator: torch.Generator, device: str | torch.device) -> list[Tensor]:
    """One epoch's shuffled index batches: every index in 0..n-1 exactly once; the last may be smaller.

    Args:
        n: number of samples.
        batch_size: samples per batch.
        generator: drives the shuffle (a seeded generator gives the same epochs in the same order).
        device: where the index tensors live (the data's device, so ``x[idx]`` needs no transfer).
    """
    perm = torch.randperm(n, generator=generator, device=generator.device)
    return list(perm.to(device).split(batch_size))


# ---------------------------------------------------------------------------------------------
# Raw cache, split, subset, normalization
# ---------------------------------------------------------------------------------------------


def _load_raw(cfg: DatasetConfig) -> RawData:
    return _cached_raw(*_raw_key(cfg))


def _raw_key(cfg: DatasetConfig) -> tuple[str, tuple[tuple[str, object], ...]]:
    name = DATASETS.canonical(cfg.name)
    return name, tuple((f, getattr(cfg, f)) for f in _RAW_FIELDS[name])


@functools.lru_cache(maxsize=8)
def _cached_split(name: str, key: tuple, val_fraction: float, test_fraction: float, seed: int) -> dict[str, tuple]:
    """``_split`` once per dataset and split settings in a process (a study's trials share them:
    scikit-learn's stratified split cost ~3 ms a trial). The parts are read-only, as the raw data."""
    parts = _split(_cached_raw(name, key), val_fraction, test_fraction, seed)
    for x, y in parts.values():
        for array in (x, y):
            array.setflags(write=False)
    return parts


@functools.lru_cache(maxsize=4)  # a worker rarely alternates between more datasets; CIFAR is 180 MB
def _cached_raw(name: str, key: tuple[tuple[str, object], ...]) -> RawData:
    """The loader sees a config with only its declared fields set, so the cache key is complete."""
    raw = DATASETS.get(name)(DatasetConfig(name=name, **dict(key)))
    for array in (raw.x, raw.y, raw.x_test, raw.y_test):
        if array is not None:
            array.setflags(write=False)  # cached for the whole process: nobody may write into it
    return raw


def _split(raw: RawData, val_fraction: float, test_fraction: float, seed: int) -> dict[str, tuple]:
    """Stratified train/val/test parts {split: (x, y)}; sizes are fractions of the labelled pool."""
    pool = np.arange(len(raw.y))
    if raw.x_test is None and val_fraction + test_fraction >= 1:
        total = val_fraction + test_fraction
        raise ConfigError(f"dataset.val_fraction + dataset.test_fraction = {total} leaves no training data")
    if raw.x_test is None:
        pool, test = _carve(pool, raw.y, round(test_fraction * len(raw.y)), seed)
        test_part = (raw.x[test], raw.y[test])
    else:
        test_part = (raw.x_test, raw.y_test)
    train, val = _carve(pool, raw.y[pool], round(val_fraction * len(raw.y)), seed)
    return {"train": (raw.x[train], raw.y[train]), "val": (raw.x[val], raw.y[val]), "test": test_part}


def _carve(index: np.ndarray, y: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``index`` into (kept, carved-out) with ``size`` carved out, stratified by ``y``."""
    try:
        kept, out = stratified_split(y, max(size, 1), seed)
    except ValueError as err:  # too few samples per class for a stratified split of that size
        raise ConfigError(f"cannot split {len(index)} samples stratified ({size} held out): {err}") from err
    return index[kept], index[out]


def stratified_split(y: np.ndarray, n_out: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (kept, out), ``n_out`` of them out, each class in proportion.

    The algorithm and random draws of scikit-learn's ``train_test_split(..., stratify=y,
    random_state=seed)`` (``StratifiedShuffleSplit``, BSD-3, as of 1.9), so every split made before
    equals this one (tests/engine/test_data.py compares them); written out because importing
    scikit-learn cost each worker process ~0.7 s of start-up, and a split must not change with
    the installed scikit-learn.
    """
    n_kept = len(y) - n_out
    classes, y_indices, class_counts = np.unique(y, return_inverse=True, return_counts=True)
    _check_stratifiable(len(y), n_out, len(classes), class_counts)
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    rng = np.random.RandomState(seed)
    kept_per_class = _approximate_mode(class_counts, n_kept, rng)
    out_per_class = _approximate_mode(class_counts - kept_per_class, n_out, rng)
    kept, out = [], []
    for members, n_k, n_o, count in zip(class_indices, kept_per_class, out_per_class, class_counts):
        shuffled = members.take(rng.permutation(count), mode="clip")
        kept.extend(shuffled[:n_k])
        out.extend(shuffled[n_k : n_k + n_o])
    return rng.permutation(kept), rng.permutation(out)


def _check_stratifiable(n: int, n_out: int, n_classes: int, class_counts: np.ndarray) -> None:
    if not 0 < n_out < n:
        raise ValueError(f"{n_out} held out of {n} samples; it must be between 1 and {n - 1}")
    if class_counts.min() < 2:
        raise ValueError("the least populated class has only 1 member; every class needs at least 2")
    for part, size in (("kept", n - n_out), ("held-out", n_out)):
        if size < n_classes:
            raise ValueError(
                f"the {part} part ({size}) must hold at least one sample of each of the {n_classes} classes"
            )


def _approximate_mode(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """How many of ``n_draws`` each class gets: the floor of its share, then one more for the
    largest remainders, ties broken at random (scikit-learn's ``_approximate_mode``)."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (tied,) = np.where(remainder == value)
            add_now = min(len(tied), need_to_add)
            floored[rng.choice(tied, size=add_now, replace=False)] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)


def _select_classes(parts: dict[str, tuple], classes: list[int], num_classes: int) -> dict[str, tuple]:
    """Keep only ``classes`` in every split, relabelled to their position in ``classes``."""
    if max(classes) >= num_classes:
        raise ConfigError(f"dataset.classes={classes} is invalid; this dataset has labels 0..{num_classes - 1}")
    relabel = np.full(num_classes, -1, dtype=np.int64)
    relabel[classes] = np.arange(len(classes))
    selected = {}
    for split, (x, y) in parts.items():
        keep = relabel[y] >= 0
        selected[split] = (x[keep], relabel[y[keep]])
    return selected


def _truncate(x: np.ndarray, y: np.ndarray, max_train: Optional[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``max_train`` of a seeded permutation, in split order (so budgets are nested)."""
    if max_train is None or max_train >= len(y):
        return x, y
    keep = np.sort(np.random.default_rng(seed).permutation(len(y))[:max_train])
    return x[keep], y[keep]


def _norm_stats(cfg: DatasetConfig, x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``_fit_norm`` once per training split and kind in a process: a study's trials share them."""
    classes = None if cfg.classes is None else tuple(cfg.classes)
    key = (_raw_key(cfg), cfg.val_fraction, cfg.test_fraction, cfg.split_seed, classes, cfg.max_train, cfg.input_norm)
    if key not in _NORM_STATS:
        if len(_NORM_STATS) >= _NORM_STATS_KEPT:
            _NORM_STATS.clear()
        _NORM_STATS[key] = _fit_norm(x_train, cfg.input_norm)
        for array in _NORM_STATS[key]:
            array.setflags(write=False)
    return _NORM_STATS[key]


_NORM_STATS: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
_NORM_STATS_KEPT = 32  # a few KB each (one shift and one scale per feature)


def _fit_norm(x_train: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature (shift, scale) from the training split: x -> (x - shift) / scale."""
    flat = x_train.reshape(len(x_train), -1)
    if kind == "zscore":
        shift, scale = flat.mean(axis=0, dtype=np.float64), flat.std(axis=0, dtype=np.float64)
    elif kind == "minmax":
        shift = flat.min(axis=0).astype(np.float64)
        scale = flat.max(axis=0).astype(np.float64) - shift
    elif kind == "channel":
        shift, scale = _channel_stats(x_train)
    else:
        return np.zeros(flat.shape[1]), np.ones(flat.shape[1])
    scale[scale == 0] = 1.0  # constant features (digits' border pixels) stay constant, not NaN
    return shift, scale


def _channel_stats(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std over samples and positions (the usual image normalization, which
    keeps the image's spatial structure, unlike a per-pixel zscore), repeated per feature."""
    channels = x_train.shape[1] if x_train.ndim > 2 else 1
    per_channel = x_train.reshape(len(x_train), channels, -1).transpose(1, 0, 2).reshape(channels, -1)
    mean, std = per_channel.mean(axis=1, dtype=np.float64), per_channel.std(axis=1, dtype=np.float64)
    positions = int(np.prod(x_train.shape[2:])) if x_train.ndim > 2 else x_train.shape[1]
    return np.repeat(mean, positions), np.repeat(std, positions)


def _apply_norm(x: np.ndarray, shift: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(N, *shape) any dtype -> new float32 array (never a view of the cached raw data)."""
    flat = x.reshape(len(x), -1).astype(np.float32)
    flat -= shift.astype(np.float32)
    flat /= scale.astype(np.float32)
    return flat.reshape(x.shape)


# ---------------------------------------------------------------------------------------------
# Embedded datasets: digits, mnist1d, synthetic
# ---------------------------------------------------------------------------------------------


@_dataset("digits")
def _digits(cfg: DatasetConfig) -> RawData:
    """sklearn's 1797 8x8 digits, pixel values 0..16, no own test split."""
    x, y = _digits_arrays()
    return RawData(x=x.reshape(-1, 1, 8, 8), y=y.astype(np.int64), num_classes=10)


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """What ``sklearn.datasets.load_digits(return_X_y=True)`` returns, read from the CSV it reads
    (inside the installed scikit-learn, found without importing it: that costs ~0.7 s)."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz") if spec else None
    if path is None or not path.is_file():  # scikit-learn moved its data: ask it
        from sklearn.datasets import load_digits

        return load_digits(return_X_y=True)
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1], table[:, -1].astype(int)


@_dataset("mnist1d")
def _mnist1d(cfg: DatasetConfig) -> RawData:
    """MNIST-1D generated offline: 4000 train / 1000 test x 40 features, shape (1, 40)."""
    from mnist1d.data import get_dataset_args, make_dataset  # never get_dataset(): it downloads

    with _global_rng_preserved():  # make_dataset reseeds random and numpy's global RNG to 42
        data = make_dataset(get_dataset_args())
    return RawData(
        x=data["x"][:, None, :],
        y=data["y"].astype(np.int64),
        num_classes=10,
        x_test=data["x_test"][:, None, :],
        y_test=data["y_test"].astype(np.int64),
    )


@contextmanager
def _global_rng_preserved() -> Iterator[None]:
    """Restore Python's and numpy's global RNG states on exit, whatever the body does to them."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def synthetic_class_sep(difficulty: float) -> float:
    """``make_classification``'s class_sep for a difficulty: 0 -> 2.0 (easy) .. 1 -> 0.1 (hard), linear.

    Measured with the defaults (2000 samples, 32 features, 4 classes, 30% held out): a 2x128 MLP
    scores 0.98 / 0.88 / 0.74 at difficulty 0 / 0.5 / 1 and logistic regression 0.83 / 0.58 / 0.23,
    so the task stays learnable but non-linear at difficulty 1 (clusters differ in shape, not place).
    """
    return 2.0 - 1.9 * difficulty


@_dataset("synthetic", uses=("n_samples", "n_features", "n_classes", "difficulty", "split_seed"))
def _synthetic(cfg: DatasetConfig) -> RawData:
    """sklearn ``make_classification``: Gaussian clusters on hypercube vertices, shape (n_features,)."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=cfg.n_samples,
        n_features=cfg.n_features,
        n_classes=cfg.n_classes,
        n_informative=informative_features(cfg.n_features, cfg.n_classes),
        n_redundant=0,
        n_clusters_per_class=2,
        class_sep=synthetic_class_sep(cfg.difficulty),
        flip_y=0.0,  # no label noise: difficulty is the one knob
        random_state=cfg.split_seed,
    )
    return RawData(x=x.astype(np.float32), y=y.astype(np.int64), num_classes=cfg.n_classes)


# ---------------------------------------------------------------------------------------------
# File datasets: mnist, fashion_mnist (IDX), cifar10, cifar100 (binary versions), svhn (.mat)
# ---------------------------------------------------------------------------------------------

#: The config fields a file dataset's loader reads: where its files are, and whether to fetch them.
_FILE_FIELDS = ("root", "download")


def _read_bytes(path: Path) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        return handle.read()


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (magic 0x0000 08 <ndim>, big-endian int32 sizes) as a uint8 array.

    Raises:
        ConfigError: wrong magic number, dimension count or length.
    """
    raw = _read_bytes(Path(path))
    if len(raw) < 4 + 4 * ndim or raw[:3] != b"\x00\x00\x08" or raw[3] != ndim:
        magic = raw[:4].hex()
        raise ConfigError(f"{path} is not an IDX file of unsigned bytes with {ndim} dimension(s) (magic {magic})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(shape):
        raise ConfigError(f"{path}: header says {shape} = {math.prod(shape)} bytes, file has {body.size}")
    return body.reshape(shape)


def _idx_pair(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N, 1, 28, 28) uint8 images and (N,) int64 labels, checked against each other."""
    x, y = read_idx(images, 3), read_idx(labels, 1).astype(np.int64)
    if len(x) != len(y) or x.shape[1:] != (28, 28) or (y.size and y.max() > 9):
        raise ConfigError(
            f"{images} / {labels}: {x.shape} images, {y.shape} labels; expected (N, 28, 28) and (N,) in 0..9"
        )
    return x[:, None], y


def _idx_dataset(name: str, cfg: DatasetConfig) -> RawData:
    files = dataset_files(name, cfg.root, cfg.download)
    x, y = _idx_pair(files["train-images-idx3-ubyte"], files["train-labels-idx1-ubyte"])
    x_test, y_test = _idx_pair(files["t10k-images-idx3-ubyte"], files["t10k-labels-idx1-ubyte"])
    return RawData(x=x, y=y, num_classes=10, x_test=x_test, y_test=y_test)


@_dataset("mnist", uses=_FILE_FIELDS)
def _mnist(cfg: DatasetConfig) -> RawData:
    """MNIST from IDX files: 60000 train / 10000 test, shape (1, 28, 28)."""
    return _idx_dataset("mnist", cfg)


@_dataset("fashion_mnist", uses=_FILE_FIELDS)
def _fashion_mnist(cfg: DatasetConfig) -> RawData:
    """Fashion-MNIST from IDX files: 60000 train / 10000 test, shape (1, 28, 28)."""
    return _idx_dataset("fashion_mnist", cfg)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 binary batch: records of 1 label byte + 3072 pixel bytes (R, G, B planes of 32x32).

    Returns:
        (N, 3, 32, 32) uint8 images and (N,) int64 labels.
    """
    return _cifar_records(Path(path), label_bytes=1, num_classes=10, what="a CIFAR-10 binary batch")


def read_cifar100(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-100 binary file: records of a coarse and a fine label byte + 3072 pixel bytes.

    Returns:
        (N, 3, 32, 32) uint8 images and (N,) int64 fine labels (100 classes).
    """
    return _cifar_records(Path(path), label_bytes=2, num_classes=100, what="a CIFAR-100 binary file")


def _cifar_records(path: Path, label_bytes: int, num_classes: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Records of ``label_bytes`` label bytes (the last one is the label used) + R, G, B planes of 32x32."""
    size = label_bytes + 3072
    raw = np.frombuffer(_read_bytes(path), dtype=np.uint8)
    if raw.size % size:
        raise ConfigError(f"{path} is not {what}: {raw.size} bytes is not a multiple of {size}")
    records = raw.reshape(-1, size)
    y = records[:, label_bytes - 1].astype(np.int64)
    if y.size and y.max() >= num_classes:
        hint = " (CIFAR-100?)" if num_classes == 10 else ""
        raise ConfigError(f"{path} is not {what}: label {y.max()} > {num_classes - 1}{hint}")
    return records[:, label_bytes:].reshape(-1, 3, 32, 32), y


@_dataset("cifar10", uses=_FILE_FIELDS)
def _cifar10(cfg: DatasetConfig) -> RawData:
    """CIFAR-10 from the binary batches: 50000 train / 10000 test, shape (3, 32, 32)."""
    files = dataset_files("cifar10", cfg.root, cfg.download)
    train = [read_cifar_batch(files[name]) for name in CIFAR10_FILES[:5]]
    x_test, y_test = read_cifar_batch(files["test_batch.bin"])
    x, y = np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train])
    return RawData(x=x, y=y, num_classes=10, x_test=x_test, y_test=y_test)


@_dataset("cifar100", uses=_FILE_FIELDS)
def _cifar100(cfg: DatasetConfig) -> RawData:
    """CIFAR-100 from the binary files, fine labels: 50000 train / 10000 test, 100 classes, shape (3, 32, 32)."""
    files = dataset_files("cifar100", cfg.root, cfg.download)
    x, y = read_cifar100(files["train.bin"])
    x_test, y_test = read_cifar100(files["test.bin"])
    return RawData(x=x, y=y, num_classes=100, x_test=x_test, y_test=y_test)


def read_svhn(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An SVHN cropped-digits .mat file: ``X`` (32, 32, 3, N) uint8 and ``y`` (N, 1), where 10 is digit 0.

    Returns:
        (N, 3, 32, 32) uint8 images and (N,) int64 labels in 0..9.
    """
    from scipy.io import loadmat  # only SVHN needs scipy.io (~0.1 s to import)

    path = Path(path)
    try:
        mat = loadmat(io.BytesIO(_read_bytes(path)) if path.suffix == ".gz" else path)
    except (ValueError, TypeError, OSError) as err:  # scipy's reader says ValueError for most bad files
        raise ConfigError(f"{path} is not a MATLAB file with SVHN's X and y: {one_line(err, 200)}") from err
    x, y = mat.get("X"), mat.get("y")
    if x is None or y is None or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.size != x.shape[3]:
        shapes = [getattr(a, "shape", None) for a in (x, y)]
        raise ConfigError(f"{path}: X, y have shapes {shapes}; expected (32, 32, 3, N) and (N, 1)")
    # (H, W, C, N) -> (N, C, H, W), contiguous so that batches are cheap views
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1), dtype=np.uint8), y.reshape(-1).astype(np.int64) % 10


@_dataset("svhn", uses=_FILE_FIELDS)
def _svhn(cfg: DatasetConfig) -> RawData:
    """SVHN cropped digits (format 2): 73257 train / 26032 test, shape (3, 32, 32); extra_32x32 is not used."""
    files = dataset_files("svhn", cfg.root, cfg.download)
    x, y = read_svhn(files["train_32x32.mat"])
    x_test, y_test = read_svhn(files["test_32x32.mat"])
    return RawData(x=x, y=y, num_classes=10, x_test=x_test, y_test=y_test)
