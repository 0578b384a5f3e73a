"""pipeline.engine.data: shapes, splits, normalization, subsets, batching and the file readers."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from pipeline.config import ConfigError, DatasetConfig
from pipeline.engine import data

CONF_DATASET = Path(__file__).resolve().parents[2] / "conf" / "dataset"
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]


def load(name: str = "digits", **kwargs) -> data.Splits:
    return data.load_dataset(DatasetConfig(name=name, **kwargs))


def rows(x: torch.Tensor) -> np.ndarray:
    """(N, ...) -> (N, F) rows sorted lexicographically, to compare sets of samples."""
    flat = x.reshape(len(x), -1).numpy()
    return flat[np.lexsort(flat.T[::-1])]


def all_splits(s: data.Splits) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(s.x_train, s.y_train), (s.x_val, s.y_val), (s.x_test, s.y_test)]


# --- the embedded datasets ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, input_shape, num_classes, sizes",
    [
        ("digits", (1, 8, 8), 10, (1079, 359, 359)),
        ("mnist1d", (1, 40), 10, (3200, 800, 1000)),
        ("synthetic", (32,), 4, (1200, 400, 400)),
    ],
)
def test_embedded_dataset_shapes_and_dtypes(name, input_shape, num_classes, sizes):
    s = load(name)
    assert s.input_shape == input_shape and s.num_classes == num_classes
    for (x, y), size in zip(all_splits(s), sizes):
        assert x.shape == (size, *input_shape) and x.dtype == torch.float32
        assert y.shape == (size,) and y.dtype == torch.int64
        assert set(y.unique().tolist()) == set(range(num_classes))
        assert torch.isfinite(x).all()


def test_synthetic_fields_shape_the_data():
    s = load("synthetic", n_samples=500, n_features=12, n_classes=3, difficulty=0.2)
    assert s.input_shape == (12,) and s.num_classes == 3
    assert len(s.y_train) + len(s.y_val) + len(s.y_test) == 500
    easy, hard = load("synthetic", difficulty=0.0), load("synthetic", difficulty=1.0)
    assert not torch.equal(easy.x_train, hard.x_train)
    assert data.synthetic_class_sep(0.0) > data.synthetic_class_sep(0.5) > data.synthetic_class_sep(1.0) > 0


def test_mnist1d_sizes_and_global_rng_untouched():
    data._cached_raw.cache_clear()  # make sure make_dataset really runs here
    random.seed(123)
    np.random.seed(123)
    expected = (random.random(), np.random.rand())
    random.seed(123)
    np.random.seed(123)
    s = load("mnist1d", val_fraction=0.25)
    assert (random.random(), np.random.rand()) == expected
    assert len(s.y_train) + len(s.y_val) == 4000 and len(s.y_val) == 1000 and len(s.y_test) == 1000


# --- splits ---------------------------------------------------------------------------------


def test_digits_splits_partition_the_dataset():
    from sklearn.datasets import load_digits

    s = load(input_norm="none")
    together = torch.cat([s.x_train, s.x_val, s.x_test])
    raw = torch.tensor(load_digits().data, dtype=torch.float32)
    np.testing.assert_array_equal(rows(together), rows(raw))  # same multiset: disjoint and complete


def test_synthetic_splits_are_disjoint():
    s = load("synthetic", input_norm="none")
    sets = [{tuple(r) for r in x.numpy()} for x, _ in all_splits(s)]
    assert sum(len(part) for part in sets) == 2000 == len(set.union(*sets))


def test_split_is_deterministic_in_split_seed():
    a, b, c = load(split_seed=3), load(split_seed=3), load(split_seed=4)
    for (xa, ya), (xb, yb) in zip(all_splits(a), all_splits(b)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.y_train, c.y_train)
    assert not np.array_equal(rows(a.x_test), rows(c.x_test))  # other samples, not just reordered


def test_split_is_stratified():
    s = load()
    overall = torch.bincount(torch.cat([s.y_train, s.y_val, s.y_test]), minlength=10) / 1797
    for _, y in all_splits(s):
        share = torch.bincount(y, minlength=10) / len(y)
        assert (share - overall).abs().max() < 0.01


def _labels(kind: str) -> np.ndarray:
    if kind == "digits":
        return data._digits_arrays()[1]
    if kind == "imbalanced":  # ties between class remainders, a class of 2
        return np.repeat(np.arange(5), [2, 7, 7, 30, 54])
    return np.random.default_rng(0).integers(0, 10, 4000)  # mnist1d-like: 10 classes, random counts


@pytest.mark.parametrize("kind", ["digits", "imbalanced", "random"])
def test_stratified_split_is_scikit_learns(kind):
    """Our split is scikit-learn's train_test_split(stratify=...), draw for draw: splits made
    before it was written out stay the same (and must not change with scikit-learn's version)."""
    from sklearn.model_selection import train_test_split

    y = _labels(kind)
    index = np.arange(len(y))
    for seed in (0, 1, 7, 123):
        for n_out in (10, 17, len(y) // 5, len(y) // 2, len(y) - 10):
            kept, out = data.stratified_split(y, n_out, seed)
            expected_kept, expected_out = train_test_split(index, test_size=n_out, stratify=y, random_state=seed)
            assert np.array_equal(kept, expected_kept) and np.array_equal(out, expected_out), (seed, n_out)


@pytest.mark.parametrize(
    "y, n_out, says",
    [
        (np.repeat(np.arange(3), [1, 5, 5]), 3, "only 1 member"),
        (np.repeat(np.arange(10), 5), 4, "at least one sample of each of the 10 classes"),
        (np.repeat(np.arange(2), 5), 10, "between 1 and 9"),
    ],
)
def test_stratified_split_refuses_what_it_cannot_make(y, n_out, says):
    with pytest.raises(ValueError, match=says):
        data.stratified_split(y, n_out, 0)


def test_digits_are_scikit_learns_read_without_importing_it():
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    x, y = data._digits_arrays()
    expected_x, expected_y = load_digits(return_X_y=True)
    assert np.array_equal(x, expected_x) and np.array_equal(y, expected_y)
    check = (
        "import sys; from pipeline.engine import data; from pipeline.config import DatasetConfig; "
        "data.load_dataset(DatasetConfig(name='digits')); print('sklearn' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", check],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.stdout.strip() == "False"  # a worker's start-up does without it (~0.7 s)


# --- input normalization --------------------------------------------------------------------


def manual_norm(raw: data.Splits, kind: str) -> list[torch.Tensor]:
    train = raw.x_train.reshape(len(raw.x_train), -1).double()
    if kind == "zscore":
        shift, scale = train.mean(0), train.std(0, unbiased=False)
    else:
        shift, scale = train.min(0).values, train.max(0).values - train.min(0).values
    scale[scale == 0] = 1
    return [((x.reshape(len(x), -1).double() - shift) / scale).reshape(x.shape).float() for x, _ in all_splits(raw)]


@pytest.mark.parametrize("kind", ["zscore", "minmax"])
def test_norm_fitted_on_train_only(kind):
    raw, normed = load(input_norm="none"), load(input_norm=kind)
    for expected, (got, _) in zip(manual_norm(raw, kind), all_splits(normed)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    train = normed.x_train.reshape(len(normed.x_train), -1)
    varying = raw.x_train.reshape(len(raw.x_train), -1).std(0) > 0
    assert (~varying).any()  # digits has constant border pixels: the zero-spread path is exercised
    if kind == "zscore":
        torch.testing.assert_close(train.mean(0), torch.zeros(64), atol=1e-5, rtol=0)
        torch.testing.assert_close(train.std(0, unbiased=False)[varying], torch.ones(int(varying.sum())))
    else:
        assert train.min() >= 0 and train.max() <= 1
        assert (train.max(0).values[varying] == 1).all()
    assert normed.x_val.reshape(len(normed.x_val), -1).mean(0).abs().max() > 1e-3  # not refitted on val


@pytest.mark.parametrize(
    "recipe", [{"max_train": 100}, {"classes": [7, 3]}, {"split_seed": 5}, {"val_fraction": 0.3}, {}]
)
def test_norm_statistics_are_kept_per_training_split(recipe):
    # The statistics are remembered per process: another training split must not reuse them.
    load(input_norm="zscore")
    raw, normed = load(input_norm="none", **recipe), load(input_norm="zscore", **recipe)
    for expected, (got, _) in zip(manual_norm(raw, "zscore"), all_splits(normed)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_unknown_input_norm_lists_valid():
    with pytest.raises(ConfigError, match="none, zscore, minmax"):
        load(input_norm="whiten")


# --- class subsets and max_train -------------------------------------------------------------


def test_class_subset_relabels_in_given_order():
    full, sub = load(input_norm="none"), load(input_norm="none", classes=[7, 3])
    assert sub.num_classes == 2
    for (xf, yf), (xs, ys) in zip(all_splits(full), all_splits(sub)):
        keep = (yf == 7) | (yf == 3)
        assert torch.equal(xs, xf[keep])  # the split comes first: a subset never mixes splits
        assert torch.equal(ys, (yf[keep] == 3).long())  # 7 -> 0, 3 -> 1


def test_class_subset_out_of_range():
    with pytest.raises(ConfigError, match="0..9"):
        load(classes=[3, 10])
    with pytest.raises(ConfigError, match="distinct"):
        load(classes=[3, 3])


def test_max_train_truncates_nested():
    full = load(input_norm="none")
    small, smaller = load(input_norm="none", max_train=100), load(input_norm="none", max_train=40)
    assert len(small.y_train) == 100 and len(smaller.y_train) == 40
    assert torch.equal(small.x_val, full.x_val) and torch.equal(small.x_test, full.x_test)
    small_rows = {tuple(r) for r in small.x_train.reshape(100, -1).tolist()}
    assert all(tuple(r) in small_rows for r in smaller.x_train.reshape(40, -1).tolist())
    assert torch.equal(load(input_norm="none", max_train=5000).x_train, full.x_train)


def test_results_are_fresh_tensors():
    first = load()
    first.x_train.fill_(0)
    first.y_test.fill_(0)
    second = load()
    assert second.x_train.abs().sum() > 0 and second.y_test.sum() > 0


def test_splits_to_moves_every_tensor():
    moved = load().to("meta")
    assert all(x.is_meta and y.is_meta for x, y in all_splits(moved))
    assert moved.num_classes == 10 and moved.input_shape == (1, 8, 8)


# --- batching -------------------------------------------------------------------------------


def test_batch_indices_cover_each_index_once():
    batches = data.batch_indices(103, 25, torch.Generator().manual_seed(0), "cpu")
    assert [len(b) for b in batches] == [25, 25, 25, 25, 3]
    assert torch.equal(torch.cat(batches).sort().values, torch.arange(103))
    assert all(b.dtype == torch.int64 for b in batches)


def test_batch_indices_deterministic_per_seed():
    def epochs(seed):
        gen = torch.Generator().manual_seed(seed)
        return [torch.cat(data.batch_indices(50, 8, gen, "cpu")) for _ in range(2)]

    a, b, c = epochs(1), epochs(1), epochs(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1])  # epochs differ
    assert not torch.equal(a[0], c[0])


# --- file datasets: errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, files",
    [
        ("mnist", IDX_FILES),
        ("fashion_mnist", IDX_FILES),
        ("cifar10", CIFAR_FILES),
        ("cifar100", ["train.bin", "test.bin"]),
        ("svhn", ["train_32x32.mat", "test_32x32.mat"]),
    ],
)
def test_missing_files_name_what_and_where(name, files, tmp_path):
    with pytest.raises(ConfigError) as err:
        load(name, root=str(tmp_path / "nowhere"), download=False)  # downloads: tests/engine/test_download.py
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "nowhere") in message and "dataset.root" in message
    assert all(f in message for f in files)


def test_missing_default_root_names_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("INITSTUDY_DATA", raising=False)
    with pytest.raises(ConfigError, match=str(tmp_path / ".cache" / "initstudy" / "mnist")):
        load("mnist", download=False)
    monkeypatch.setenv("INITSTUDY_DATA", str(tmp_path / "data"))
    with pytest.raises(ConfigError, match=str(tmp_path / "data" / "mnist")):
        load("mnist", download=False)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        load("imagenet")
    assert all(name in str(err.value) for name in ("digits", "mnist1d", "synthetic", "mnist", "cifar10"))


# --- file datasets: fake files in the real formats ---------------------------------------------


def write(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def fake_mnist(directory: Path, gz: bool, n_train: int = 60, n_test: int = 20) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(n_test, dtype=np.uint8) % 10,
    }
    for name, array in arrays.items():
        write(directory / (name + (".gz" if gz else "")), idx_bytes(array))
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, gz):
    arrays = fake_mnist(tmp_path, gz)
    suffix = ".gz" if gz else ""
    images = data.read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", 3)
    labels = data.read_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", 1)
    np.testing.assert_array_equal(images, arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(labels, arrays["train-labels-idx1-ubyte"])


def test_read_idx_rejects_bad_magic(tmp_path):
    write(tmp_path / "bad", b"\x00\x00\x0d\x03" + bytes(20))  # 0x0D = float32, not ubyte
    with pytest.raises(ConfigError, match="not an IDX"):
        data.read_idx(tmp_path / "bad", 3)
    write(tmp_path / "short", idx_bytes(np.zeros((4, 28, 28)))[:-5])
    with pytest.raises(ConfigError, match="header says"):
        data.read_idx(tmp_path / "short", 3)


@pytest.mark.parametrize(
    "name, layout, gz",
    [
        ("mnist", "", False),
        ("mnist", "", True),
        ("mnist", "MNIST/raw", True),  # torchvision's layout under its root
        ("mnist", "mnist", False),
        ("fashion_mnist", "FashionMNIST/raw", False),
    ],
)
def test_idx_dataset_loads_fake_files(tmp_path, name, layout, gz):
    arrays = fake_mnist(tmp_path / layout, gz)
    s = load(name, root=str(tmp_path), input_norm="none")
    assert s.input_shape == (1, 28, 28) and s.num_classes == 10
    assert (len(s.y_train), len(s.y_val), len(s.y_test)) == (48, 12, 20)
    np.testing.assert_array_equal(s.x_test[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(s.y_test.numpy(), arrays["t10k-labels-idx1-ubyte"])
    train = torch.tensor(arrays["train-images-idx3-ubyte"], dtype=torch.float32)
    np.testing.assert_array_equal(rows(torch.cat([s.x_train, s.x_val])), rows(train))


def cifar_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    records = np.concatenate([labels[:, None], images.reshape(len(images), -1)], axis=1)
    return records.astype(np.uint8).tobytes()


def fake_cifar(directory: Path, per_batch: int = 10) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(1)
    batches = []
    for name in CIFAR_FILES:
        images = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        labels = rng.permutation(np.arange(per_batch) % 10).astype(np.uint8)
        write(directory / name, cifar_bytes(images, labels))
        batches.append((images, labels))
    return batches


def test_read_cifar_batch_keeps_channel_planes(tmp_path):
    images, labels = fake_cifar(tmp_path)[0]
    x, y = data.read_cifar_batch(tmp_path / "data_batch_1.bin")
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)
    record = (tmp_path / "data_batch_1.bin").read_bytes()[:3073]  # label, then R, G, B planes of 32x32
    assert record[0] == labels[0] and record[1 + 1024 : 1 + 2048] == images[0, 1].tobytes()


def test_read_cifar_batch_rejects_wrong_size(tmp_path):
    write(tmp_path / "x.bin", bytes(3073 * 2 + 7))
    with pytest.raises(ConfigError, match="3073"):
        data.read_cifar_batch(tmp_path / "x.bin")


@pytest.mark.parametrize("layout", ["", "cifar-10-batches-bin"])
def test_cifar10_loads_fake_files(tmp_path, layout):
    batches = fake_cifar(tmp_path / layout)
    s = load("cifar10", root=str(tmp_path), input_norm="none")
    assert s.input_shape == (3, 32, 32) and s.num_classes == 10
    assert (len(s.y_train), len(s.y_val), len(s.y_test)) == (40, 10, 10)
    np.testing.assert_array_equal(s.x_test.numpy(), batches[-1][0])
    train = torch.tensor(np.concatenate([b[0] for b in batches[:5]]), dtype=torch.float32)
    np.testing.assert_array_equal(rows(torch.cat([s.x_train, s.x_val])), rows(train))


# --- validation and config files --------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "no training data"),
        ({"max_train": 0}, "max_train"),
        ({"name": "synthetic", "difficulty": 1.5}, "difficulty"),
        ({"name": "synthetic", "n_features": 2, "n_classes": 10}, "n_features"),
    ],
)
def test_bad_values_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        data.load_dataset(DatasetConfig(**kwargs))


@pytest.mark.parametrize("path", sorted(CONF_DATASET.glob("*.yaml")), ids=lambda p: p.stem)
def test_dataset_yaml_matches_registry_and_schema(path):
    node = OmegaConf.load(path)
    assert list(node.pop("defaults")) == ["base_dataset"]
    assert node.name == path.stem and node.name in data.DATASETS
    OmegaConf.merge(OmegaConf.structured(DatasetConfig), node)  # a misspelt key raises here


def test_every_dataset_has_a_yaml():
    assert sorted(p.stem for p in CONF_DATASET.glob("*.yaml")) == data.DATASETS.names()
