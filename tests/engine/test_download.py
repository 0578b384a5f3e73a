"""pipeline.engine.download: the file datasets fetched from a real HTTP server on 127.0.0.1.

The server serves small files made here in the real formats (gzipped IDX, tar.gz of CIFAR binary
records, MATLAB .mat), with the checksum table patched to their md5s and no mirror but the test's
own (``$INITSTUDY_DATASET_MIRROR``), so nothing here reaches the internet.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from pipeline.config import ConfigError, DatasetConfig
from pipeline.engine import data, download
from tests.engine.test_data import cifar_bytes, idx_bytes

ROOT = Path(__file__).resolve().parents[2]
FILE_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100", "svhn")


# --- a local mirror ----------------------------------------------------------------------------


@dataclass
class Mirror:
    """What the server serves ({URL path: bytes}), which paths it drops half-way, what it was asked."""

    files: dict[str, bytes] = field(default_factory=dict)
    drop: set[str] = field(default_factory=set)
    delay_s: float = 0.0
    requests: list[str] = field(default_factory=list)
    url: str = ""


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        mirror: Mirror = self.server.mirror
        path = self.path.lstrip("/")
        mirror.requests.append(path)
        time.sleep(mirror.delay_s)
        body = mirror.files.get(path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        # A dropped connection: the full Content-Length announced, half the body sent, then closed.
        self.wfile.write(body[: len(body) // 2] if path in mirror.drop else body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def mirror():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.mirror = Mirror(url=f"http://127.0.0.1:{server.server_port}")
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server.mirror
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    """No inherited mirror or cache location, and no raw data cached from another test."""
    for name in (download.MIRROR_ENV, download.DATA_ENV):
        monkeypatch.delenv(name, raising=False)
    data._cached_raw.cache_clear()
    data._cached_split.cache_clear()
    yield
    data._cached_raw.cache_clear()
    data._cached_split.cache_clear()


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


# --- small files in the real formats ------------------------------------------------------------


def md5(payload: bytes) -> str:
    return hashlib.md5(payload).hexdigest()


def tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def images(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8)


def fake_idx() -> tuple[dict[str, bytes], dict]:
    rng = np.random.default_rng(0)
    x, x_test = images(rng, 40, (28, 28)), images(rng, 10, (28, 28))
    y, y_test = np.arange(40, dtype=np.uint8) % 10, np.arange(10, dtype=np.uint8) % 10
    arrays = {"train-images-idx3-ubyte": x, "train-labels-idx1-ubyte": y}
    arrays |= {"t10k-images-idx3-ubyte": x_test, "t10k-labels-idx1-ubyte": y_test}
    served = {f"{name}.gz": gzip.compress(idx_bytes(array)) for name, array in arrays.items()}
    return served, {"x": x[:, None], "y": y, "x_test": x_test[:, None], "y_test": y_test}


def fake_cifar10(per_batch: int = 20) -> tuple[dict[str, bytes], dict]:
    rng = np.random.default_rng(1)
    batches = [(images(rng, per_batch, (3, 32, 32)), np.arange(per_batch, dtype=np.uint8) % 10) for _ in range(6)]
    members = {f"cifar-10-batches-bin/{name}": cifar_bytes(*b) for name, b in zip(download.CIFAR10_FILES, batches)}
    members["cifar-10-batches-bin/batches.meta.txt"] = b"airplane\n"
    members["cifar-10-batches-bin/../../escaped.bin"] = b"never written"  # a hostile path is skipped
    x, y = np.concatenate([b[0] for b in batches[:5]]), np.concatenate([b[1] for b in batches[:5]])
    return {"cifar-10-binary.tar.gz": tar_gz(members)}, {
        "x": x,
        "y": y,
        "x_test": batches[5][0],
        "y_test": batches[5][1],
    }


def cifar100_bytes(x: np.ndarray, fine: np.ndarray) -> bytes:
    coarse = fine // 5
    return np.concatenate([coarse[:, None], fine[:, None], x.reshape(len(x), -1)], axis=1).astype(np.uint8).tobytes()


def fake_cifar100() -> tuple[dict[str, bytes], dict]:
    rng = np.random.default_rng(2)
    x, x_test = images(rng, 300, (3, 32, 32)), images(rng, 100, (3, 32, 32))
    y, y_test = np.arange(300, dtype=np.uint8) % 100, np.arange(100, dtype=np.uint8)
    members = {
        "cifar-100-binary/train.bin": cifar100_bytes(x, y),
        "cifar-100-binary/test.bin": cifar100_bytes(x_test, y_test),
    }
    return {"cifar-100-binary.tar.gz": tar_gz(members)}, {"x": x, "y": y, "x_test": x_test, "y_test": y_test}


def svhn_mat(x: np.ndarray, y: np.ndarray) -> bytes:
    """SVHN's layout: X (32, 32, 3, N), y (N, 1) with 10 for the digit 0."""
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"X": x.transpose(2, 3, 1, 0), "y": np.where(y == 0, 10, y)[:, None].astype(np.uint8)})
    return buffer.getvalue()


def fake_svhn() -> tuple[dict[str, bytes], dict]:
    rng = np.random.default_rng(3)
    x, x_test = images(rng, 40, (3, 32, 32)), images(rng, 10, (3, 32, 32))
    y, y_test = np.arange(40) % 10, np.arange(10)
    served = {"train_32x32.mat": svhn_mat(x, y), "test_32x32.mat": svhn_mat(x_test, y_test)}
    return served, {"x": x, "y": y, "x_test": x_test, "y_test": y_test}


FAKES = {
    "mnist": fake_idx,
    "fashion_mnist": fake_idx,
    "cifar10": fake_cifar10,
    "cifar100": fake_cifar100,
    "svhn": fake_svhn,
}


def table_md5s(name: str, served: dict[str, bytes]) -> dict[str, str]:
    """{resource: md5} of the test's files: what the patched checksum table holds."""
    return {resource.name: md5(served[resource.name]) for resource in download.FILE_DATASETS[name].resources}


def patch_table(monkeypatch, name: str, md5s: dict[str, str], mirrors: tuple[str, ...] = ()) -> None:
    """The test's checksums, and no public mirror: only $INITSTUDY_DATASET_MIRROR and ``mirrors``."""
    source = download.FILE_DATASETS[name]
    resources = tuple(replace(r, md5=md5s[r.name]) for r in source.resources)
    monkeypatch.setitem(download.FILE_DATASETS, name, replace(source, mirrors=mirrors, resources=resources))


def serve(monkeypatch, mirror: Mirror, name: str, prefix: str = "") -> dict:
    """Put ``name``'s fake files on the mirror (under ``prefix``) and point the table at them."""
    served, arrays = FAKES[name]()
    mirror.files |= {prefix + file: payload for file, payload in served.items()}
    patch_table(monkeypatch, name, table_md5s(name, served))
    return arrays


def raw(name: str, root: str | None = None, **kwargs) -> data.RawData:
    return data.DATASETS.get(name)(DatasetConfig(name=name, root=root, **kwargs))


def leftovers(base: Path) -> list[str]:
    """Everything in ``base`` but the lock file: what a failed download left behind."""
    return sorted(p.name for p in base.iterdir() if p.name != download.LOCK_FILE) if base.exists() else []


# --- (1) a good download: verified, cached, read; a second load asks nothing -------------------


@pytest.mark.parametrize("name", FILE_DATASETS)
def test_download_verifies_caches_and_reads_every_file_dataset(name, mirror, monkeypatch, tmp_path):
    arrays = serve(monkeypatch, mirror, name)
    monkeypatch.setenv(download.MIRROR_ENV, mirror.url)
    monkeypatch.setenv(download.DATA_ENV, str(tmp_path / "data"))
    loaded = raw(name)
    for key, expected in arrays.items():
        np.testing.assert_array_equal(getattr(loaded, key), expected, err_msg=key)
    assert sorted(mirror.requests) == sorted(r.name for r in download.FILE_DATASETS[name].resources)
    base = tmp_path / "data" / name
    assert not [p for p in base.rglob("*") if p.name.endswith(".part")]
    assert not (tmp_path / "escaped.bin").exists() and not (tmp_path / "data" / "escaped.bin").exists()
    data._cached_raw.cache_clear()
    splits = data.load_dataset(DatasetConfig(name=name, val_fraction=0.4, input_norm="none"))
    assert len(splits.y_train) + len(splits.y_val) == len(arrays["y"])
    assert len(mirror.requests) == len(download.FILE_DATASETS[name].resources)  # read from the cache


def test_what_a_killed_download_left_is_removed_and_never_read(mirror, monkeypatch, tmp_path):
    arrays = serve(monkeypatch, mirror, "cifar100")
    monkeypatch.setenv(download.MIRROR_ENV, mirror.url)
    base = tmp_path / "c100"
    (base / ".cifar-100-binary.tar.gz.x1.part").parent.mkdir(parents=True)
    (base / ".cifar-100-binary.tar.gz.x1.part").write_bytes(b"half an archive")
    (base / ".cifar-100-binary.x2.part").mkdir()
    (base / ".cifar-100-binary.x2.part" / "train.bin").write_bytes(b"half a file")
    np.testing.assert_array_equal(raw("cifar100", str(base)).y_test, arrays["y_test"])
    assert leftovers(base) == ["cifar-100-binary"]


def test_cache_directory_is_root_then_env_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert download.dataset_dir("svhn", None) == tmp_path / "home" / ".cache" / "initstudy" / "svhn"
    monkeypatch.setenv(download.DATA_ENV, str(tmp_path / "shared"))
    assert download.dataset_dir("svhn", None) == tmp_path / "shared" / "svhn"
    assert download.dataset_dir("svhn", str(tmp_path / "mine")) == tmp_path / "mine"


def test_files_a_user_already_has_are_read_without_a_request(mirror, monkeypatch, tmp_path):
    served, arrays = fake_idx()
    for file, payload in served.items():  # torchvision's layout, gzipped
        (tmp_path / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
        (tmp_path / "MNIST" / "raw" / file).write_bytes(payload)
    monkeypatch.setenv(download.MIRROR_ENV, mirror.url)
    np.testing.assert_array_equal(raw("mnist", str(tmp_path)).x_test, arrays["x_test"])
    assert mirror.requests == []


# --- (2) a checksum mismatch --------------------------------------------------------------------


def test_checksum_mismatch_is_one_line_and_leaves_no_file(mirror, monkeypatch, tmp_path):
    serve(monkeypatch, mirror, "cifar10")
    patch_table(monkeypatch, "cifar10", {"cifar-10-binary.tar.gz": "0" * 32})
    monkeypatch.setenv(download.MIRROR_ENV, mirror.url)
    with pytest.raises(ConfigError) as err:
        raw("cifar10", str(tmp_path / "c"))
    message, got = str(err.value), md5(mirror.files["cifar-10-binary.tar.gz"])
    assert "\n" not in message and "cifar-10-binary.tar.gz" in message
    assert f"md5 {got}, expected {'0' * 32}" in message and f"{mirror.url}/cifar-10-binary.tar.gz" in message
    assert leftovers(tmp_path / "c") == []


# --- (3) a connection dropped half-way ----------------------------------------------------------


def test_a_dropped_connection_tries_the_next_mirror(mirror, monkeypatch, tmp_path):
    arrays = serve(monkeypatch, mirror, "svhn", prefix="bad/")
    serve(monkeypatch, mirror, "svhn", prefix="good/")
    mirror.drop = {"bad/train_32x32.mat"}
    source = download.FILE_DATASETS["svhn"]
    monkeypatch.setitem(download.FILE_DATASETS, "svhn", replace(source, mirrors=(f"{mirror.url}/good",)))
    monkeypatch.setenv(download.MIRROR_ENV, f"{mirror.url}/bad")
    loaded = raw("svhn", str(tmp_path / "s"))
    np.testing.assert_array_equal(loaded.x, arrays["x"])
    assert mirror.requests == ["bad/train_32x32.mat", "good/train_32x32.mat", "bad/test_32x32.mat"]
    assert leftovers(tmp_path / "s") == ["test_32x32.mat", "train_32x32.mat"]


def test_a_dropped_connection_on_the_last_mirror_is_one_line_and_nothing_partial_is_read(mirror, monkeypatch, tmp_path):
    serve(monkeypatch, mirror, "mnist")
    mirror.drop = {"t10k-images-idx3-ubyte.gz"}
    monkeypatch.setenv(download.MIRROR_ENV, mirror.url)
    with pytest.raises(ConfigError) as err:
        raw("mnist", str(tmp_path / "m"))
    message = str(err.value)
    assert "\n" not in message and "t10k-images-idx3-ubyte.gz" in message and "closed after" in message
    # The files fetched before it stay (verified); the broken one is nowhere, not even as a .part.
    assert leftovers(tmp_path / "m") == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    mirror.drop = set()
    raw("mnist", str(tmp_path / "m"))  # the next run fetches only what is missing
    assert mirror.requests[3:] == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


# --- (4) four processes at once ------------------------------------------------------------------

_PATCH = """
import json, os, sys
from dataclasses import replace
from pipeline.engine import download
for name, md5s in json.loads(os.environ["TEST_DATASET_MD5S"]).items():
    source = download.FILE_DATASETS[name]
    resources = tuple(replace(r, md5=md5s[r.name]) for r in source.resources)
    download.FILE_DATASETS[name] = replace(source, mirrors=(), resources=resources)
"""

_LOAD_WHEN_TOLD = """
import hashlib, time
from pathlib import Path
from pipeline.config import DatasetConfig
from pipeline.engine import data
ready, go = Path(sys.argv[1]), Path(sys.argv[2])
ready.touch()
while not go.exists():
    time.sleep(0.01)
raw = data.DATASETS.get(sys.argv[3])(DatasetConfig(name=sys.argv[3]))
print(hashlib.md5(raw.x.tobytes() + raw.y.tobytes() + raw.x_test.tobytes() + raw.y_test.tobytes()).hexdigest())
"""


def test_four_processes_download_each_file_once_and_read_the_same_data(mirror, monkeypatch, tmp_path):
    arrays = serve(monkeypatch, mirror, "mnist")
    mirror.delay_s = 0.2  # the download lasts while the others arrive
    env = {
        **os.environ,
        download.MIRROR_ENV: mirror.url,
        download.DATA_ENV: str(tmp_path / "data"),
        "TEST_DATASET_MD5S": json.dumps({"mnist": table_md5s("mnist", mirror.files)}),
    }
    script = tmp_path / "load.py"
    script.write_text(_PATCH + _LOAD_WHEN_TOLD)
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / f"ready{i}"), str(go), "mnist"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(4)) and time.monotonic() < deadline:
        time.sleep(0.02)
    go.touch()  # all four ask for the files together
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    assert sorted(mirror.requests) == sorted(mirror.files)  # each file asked for exactly once
    as_loaded = [arrays["x"], arrays["y"].astype(np.int64), arrays["x_test"], arrays["y_test"].astype(np.int64)]
    expected = hashlib.md5(b"".join(a.tobytes() for a in as_loaded)).hexdigest()
    assert {out.strip() for out, _ in outputs} == {expected}
    assert sum("another process is downloading" in err for _, err in outputs) >= 1


# --- (5) offline, (6) download=false -------------------------------------------------------------


def test_offline_is_one_line_naming_the_url_and_where_to_put_the_files_fast(monkeypatch, tmp_path):
    url = closed_port_url()
    patch_table(monkeypatch, "cifar100", {"cifar-100-binary.tar.gz": "0" * 32}, mirrors=(f"{url}/second",))
    monkeypatch.setenv(download.MIRROR_ENV, url)
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        download.ensure_dataset(DatasetConfig(name="cifar100", root=str(tmp_path / "c100")))
    message = str(err.value)
    assert time.monotonic() - start < 5
    assert "\n" not in message and f"{url}/cifar-100-binary.tar.gz" in message and f"{url}/second/" in message
    assert "refused" in message.lower() and f"put them in {tmp_path / 'c100'}" in message
    assert "cifar.html" in message and leftovers(tmp_path / "c100") == []


def test_download_false_reads_only_and_says_so_in_one_line(mirror, monkeypatch, tmp_path):
    serve(monkeypatch, mirror, "mnist")
    monkeypatch.setenv(download.MIRROR_ENV, mirror.url)
    with pytest.raises(ConfigError) as err:
        download.ensure_dataset(DatasetConfig(name="mnist", root=str(tmp_path / "m"), download=False))
    message = str(err.value)
    assert "\n" not in message and "nothing is downloaded" in message and str(tmp_path / "m") in message
    assert "train-images-idx3-ubyte" in message and "dataset.root" in message
    assert mirror.requests == [] and not (tmp_path / "m").exists()


def test_embedded_datasets_need_nothing(tmp_path):
    for name in ("digits", "mnist1d", "synthetic"):
        download.ensure_dataset(DatasetConfig(name=name, root=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()


def test_the_module_imports_no_torch():
    code = "import sys; import pipeline.engine.download; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr[-2000:]


# --- end to end through the CLI ------------------------------------------------------------------

_CLI = """
import runpy
sys.argv = ["pipeline", *sys.argv[1:]]
runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
"""


def run_cli(tmp_path: Path, mirror_url: str, data_dir: Path, md5s: dict, *args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "cli.py"
    script.write_text(_PATCH + _CLI)
    env = {
        **os.environ,
        download.MIRROR_ENV: mirror_url,
        download.DATA_ENV: str(data_dir),
        "TEST_DATASET_MD5S": json.dumps(md5s),
    }
    return subprocess.run(
        [sys.executable, str(script), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow  # three runs of the real CLI, ~30 s: in CI's slow suite
def test_a_resnet_trial_downloads_cifar10_once_then_offline_fails_in_one_line_with_no_run(mirror, tmp_path):
    served, _ = fake_cifar10()
    mirror.files |= served
    md5s = {"cifar10": table_md5s("cifar10", served)}
    trial = ["trial", "dataset=cifar10", "model=resnet", "model.depth=8", "model.width_multiplier=0.5"]
    trial += ["dataset.max_train=64", "dataset.augment=true", "dataset.input_norm=channel"]
    trial += ["batch_size=16", "train.epochs=1", "train.probe_size=16", "tracking.log_weights=false"]
    trial += ["tracking.layer_plot=false"]

    def store(name: str) -> list[str]:
        return [f"tracking.uri=sqlite:///{tmp_path}/{name}.db", f"tracking.artifact_root={tmp_path}/{name}-artifacts"]

    done = run_cli(tmp_path, mirror.url, tmp_path / "data", md5s, *trial, *store("online"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "final_accuracy=" in done.stdout and "run_id=" in done.stdout
    assert (tmp_path / "data" / "cifar10" / "cifar-10-batches-bin" / "test_batch.bin").is_file()
    assert mirror.requests == ["cifar-10-binary.tar.gz"]
    again = run_cli(tmp_path, mirror.url, tmp_path / "data", md5s, *trial, *store("online"))
    assert again.returncode == 0 and mirror.requests == ["cifar-10-binary.tar.gz"]  # the cache, no request

    offline = run_cli(tmp_path, closed_port_url(), tmp_path / "empty", md5s, *trial, *store("offline"))
    lines = offline.stderr.splitlines()
    assert offline.returncode == 2, offline.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: dataset=cifar10: could not download"), lines
    assert str(tmp_path / "empty" / "cifar10") in lines[0] and "final_accuracy" not in offline.stdout
    assert not (tmp_path / "offline.db").exists()  # no MLflow run, not even a store


def test_a_study_fetches_each_dataset_its_space_can_choose_before_anything_starts(monkeypatch, tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.study.plan import plan_study

    plan = plan_study(["space.dataset=choice(digits,mnist,svhn)", f"dataset.root={tmp_path}/d"])
    assert [(d.name, d.root) for d in plan.datasets()] == [(n, f"{tmp_path}/d") for n in ("digits", "mnist", "svhn")]
    url = closed_port_url()
    patch_table(monkeypatch, "svhn", {"train_32x32.mat": "0" * 32, "test_32x32.mat": "0" * 32})
    monkeypatch.setenv(download.MIRROR_ENV, url)
    monkeypatch.setenv(download.DATA_ENV, str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    store = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_root={tmp_path}/artifacts"]
    assert main(["run", "space.dataset=choice(digits,svhn)", f"study.output_dir={tmp_path}/studies", *store]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: dataset=svhn: could not download train_32x32.mat"), lines
    assert f"{url}/train_32x32.mat" in lines[0]
    assert not (tmp_path / "studies").exists() and not (tmp_path / "mlflow.db").exists()  # before the lock and Ray
