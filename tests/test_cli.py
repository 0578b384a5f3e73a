"""The commands' contract: bad input is one line on stderr and exit code 2, before any training and
without leaving an MLflow run behind; good input trains, records and says where."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.cli import COMMANDS, HELP_GROUPS, main
from pipeline.config import ActivationConfig, ModelConfig, NormalizationConfig
from pipeline.config.composition import group_options
from pipeline.engine.nn.models import build_model
from pipeline.engine.weights import save_weights
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parent.parent


def _db(store: list[str]) -> Path:
    return Path(store[0].partition("sqlite:///")[2])


def _runs(store: list[str]) -> list:
    """Every run in the store (opening a client would create the db, so look for the file first)."""
    if not _db(store).exists():
        return []
    client = MlflowClient(store[0].partition("=")[2])
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiment_ids) if experiment_ids else []


def _trial_error(capsys, store: list[str], *overrides: str, store_exists: bool = False) -> str:
    """Run `trial` with bad overrides; check the contract and return the one error line."""
    runs_before = [r.info.run_id for r in _runs(store)]
    capsys.readouterr()
    code = main(["trial", *store, *TINY, *overrides])
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2, captured
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "final_accuracy" not in captured.out  # nothing trained
    if store_exists:
        assert [r.info.run_id for r in _runs(store)] == runs_before  # no run added
    else:
        assert not _db(store).exists()  # no run opened (none left RUNNING or FAILED), not even a store
    return lines[0]


@pytest.fixture
def other_width_weights(tmp_path) -> Path:
    """A safetensors file of a digits MLP 16 units wide (the TINY model is 32 wide)."""
    model = build_model(ModelConfig(depth=2, width=16), ActivationConfig(), NormalizationConfig(), (64,), 10)
    path = tmp_path / "other.safetensors"
    save_weights(model, path)
    return path


@pytest.mark.parametrize(
    "overrides, names",
    [
        (["initializer=kaiming_norml"], ["'kaiming_norml'", "kaiming_normal", "orthogonal", "glorot_uniform"]),
        (["activation=rleu"], ["'rleu'", "relu", "tanh", "leaky_relu"]),
        (["dataset=imagenet"], ["'imagenet'", "digits", "mnist", "synthetic"]),
        (["normalization=batchnorm"], ["'batchnorm'", "none", "batch", "layer", "group"]),
        (["optimizer=rmsprop"], ["'rmsprop'", "sgd", "adam"]),
        (["scale=0"], ["scale=0", "> 0"]),
        (["scale=-1"], ["scale=-1", "> 0"]),
        (["batch_size=0"], ["batch_size=0", "> 0"]),
        (["batch_size=100000"], ["batch_size=100000", "larger than the training set", "1079"]),
        (["initializer.bias=orthogonal"], ["initializer.bias=orthogonal", "zeros", "torch_default"]),
        (["initializer.mode=fan_avg"], ["initializer.mode=fan_avg", "kaiming_normal", "fan_in", "fan_out"]),
        (["initializer=he_uniform", "initializer.mode=fan_sum"], ["initializer.mode=fan_sum", "fan_in", "fan_out"]),
        (["initializer=pretrained"], ["initializer.path", "initializer.run_id"]),
        (["initializer=pretrained", "initializer.path=/nonexistent/w.safetensors"], ["/nonexistent/w.safetensors"]),
        (["initializer=pretrained", "initializer.run_id=0123abc"], ["0123abc", "no MLflow store"]),
        (
            ["dataset=mnist", "dataset.root=/nonexistent/dir", "dataset.download=false"],
            ["/nonexistent/dir", "train-images-idx3-ubyte", "nothing is downloaded"],
        ),
        (["scale=("], ["scale=("]),
        (["=3"], ["'=3'"]),
        (["nosuchkey=1"], ["nosuchkey"]),
        (["model.depth=deep"], ["model.depth", "deep"]),
        pytest.param(
            ["train.device=cuda"],
            ["train.device=cuda", "cpu"],
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
        (["train.device=tpu"], ["train.device=tpu", "cpu"]),
        (["dataset.classes=[1]"], ["dataset.classes=[1]", "at least two"]),
        (["scale=inf"], ["scale=inf", "finite"]),
        (["optimizer.lr=inf"], ["optimizer.lr=inf", "finite"]),
        (["optimizer.lr=nan"], ["optimizer.lr=nan", "finite"]),
        (["optimizer.momentum=-5"], ["optimizer.momentum=-5.0", "[0, 1)"]),
        (["optimizer.momentum=1"], ["optimizer.momentum=1.0", "[0, 1)"]),
        (["optimizer.weight_decay=-1"], ["optimizer.weight_decay=-1.0", ">= 0"]),
        (["initializer.gain=inf"], ["initializer.gain=inf", "finite"]),
        (["study.name=../x"], ["study.name='../x'", "not a path"]),
        (["study.writers=-1"], ["study.writers=-1", "[0, 16]"]),
        (["study.writers=two"], ["study.writers", "two"]),
        (["model.dpeth=3"], ["unknown key 'model.dpeth'", "did you mean model.depth?", "depth, width"]),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_run(capsys, store, overrides, names):
    line = _trial_error(capsys, store, *overrides)
    for name in names:
        assert name in line, (name, line)


def test_pretrained_weights_of_another_model_are_refused_naming_the_shapes(capsys, store, other_width_weights):
    line = _trial_error(capsys, store, "initializer=pretrained", f"initializer.path={other_width_weights}")
    assert str(other_width_weights) in line
    assert "blocks.0.layer.weight model (32, 64) vs file (16, 64)" in line


def test_trial_prints_its_result_and_run_id(capsys, store):
    code = main(["trial", *store, *TINY, "activation=tanh"])
    out = capsys.readouterr().out
    assert code == 0
    fields = dict(word.split("=", 1) for word in out.split() if "=" in word)
    assert 0.0 <= float(fields["final_accuracy"]) <= 1.0
    runs = _runs(store)
    assert [r.info.run_id for r in runs] == [fields["run_id"]]
    assert runs[0].info.status == "FINISHED"
    assert fields["experiment"] == "initstudy-trials"
    # A bad input against a store that exists adds no run to it either.
    line = _trial_error(capsys, store, "initializer=pretrained", "initializer.run_id=0123abc", store_exists=True)
    assert "0123abc" in line and "not found" in line
    line = _trial_error(capsys, store, "scale=0", store_exists=True)
    assert "scale=0" in line


def test_unknown_command_lists_the_valid_ones(capsys):
    assert main(["trail", "scale=2"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown command 'trail'")
    for command in COMMANDS:
        assert command in lines[0]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_describes_the_commands_and_every_group_choice_and_runs_nothing(capsys, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)  # the default store would appear here if anything ran
    assert main(["--help"] if command is None else [command, "initializer=orthogonal", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m pipeline")
    for name in COMMANDS if command is None else [command]:
        assert f"  {name} " in out
    for group in HELP_GROUPS:
        assert f"  {group}: {', '.join(group_options(group))}" in out
    assert "orthogonal" in out and "xavier_normal" in out and "batch" in out
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args, names",
    [
        ([], ["RUN_ID"]),
        (["0123abc"], ["0123abc"]),  # no such run in the store
        (["0123abc", "train.epochs=5"], ["train.epochs=5"]),  # would be silently ignored: refused
        (["tracking.uri=sqlite:///x.db"], ["RUN_ID first"]),  # the URI is not a run id
    ],
)
def test_reproduce_bad_input_is_one_line_exit_2(capsys, store, args, names):
    code = main(["reproduce", *args, store[0]]) if args else main(["reproduce"])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ")
    for name in names:
        assert name in lines[0]
    assert not _db(store).exists()


def test_python_m_pipeline_exits_2_with_one_line(tmp_path):
    store = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_root={tmp_path}/artifacts"]
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "trial", "scale=-1", *store, *TINY],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["error: scale=-1.0 is invalid; it must be > 0"]
    assert done.stdout == ""
    assert not (tmp_path / "mlflow.db").exists()


def test_python_m_pipeline_prints_its_result_before_leaving(tmp_path):
    # The command leaves with os._exit (no interpreter teardown): its output must be flushed first.
    store = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_root={tmp_path}/artifacts"]
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "trial", *store, *TINY],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "final_accuracy=" in done.stdout and "run_id=" in done.stdout


# --- Hydra's options, and a CLI that fails fast --------------------------------------------------------


def test_cfg_job_prints_the_composed_checked_config_and_runs_nothing(capsys, tmp_path, monkeypatch):
    import yaml

    monkeypatch.chdir(tmp_path)
    assert main(["trial", "--cfg", "job", "initializer=orthogonal", "scale=0.5"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["initializer"]["name"] == "orthogonal" and config["scale"] == 0.5
    assert main(["run", "--cfg=all", "space.scale=choice(0.5,2)"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["space"]["scale"] == "choice(0.5,2)"
    assert list(tmp_path.iterdir()) == []  # no store, no study folder
    assert main(["run", "--cfg", "hydra"]) == 2
    assert "--cfg hydra is invalid; valid: job, all" in capsys.readouterr().err


def test_a_users_config_dir_adds_groups_and_experiments_checked_like_ours(capsys, store, tmp_path):
    mine = tmp_path / "my_conf"
    (mine / "initializer").mkdir(parents=True)
    (mine / "experiment").mkdir()
    (mine / "initializer" / "wide_orthogonal.yaml").write_text(
        "defaults:\n  - base_initializer\nname: orthogonal\ngain: 2.0\n"
    )
    (mine / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /initializer: wide_orthogonal\ntrain:\n  epochs: 1\n"
    )
    assert main(["--config-dir", str(mine), "trial", "experiment=mine", *store]) == 0
    run = MlflowClient(store[0].partition("=")[2]).get_run(capsys.readouterr().out.split("run_id=")[1].split()[0])
    assert run.data.params["initializer"] == "orthogonal" and run.data.params["initializer.gain"] == "2.0"
    assert run.data.params["train.epochs"] == "1"
    (mine / "initializer" / "bad.yaml").write_text("defaults:\n  - base_initializer\nname: orthogonal\ngian: 2.0\n")
    assert main(["--config-dir", str(mine), "trial", "initializer=bad", *store]) == 2  # the schema checks it
    assert "gian" in capsys.readouterr().err
    assert main(["--config-dir", str(tmp_path / "nowhere"), "trial"]) == 2
    assert "--config-dir" in capsys.readouterr().err


def test_ctrl_c_is_one_line_and_exit_130(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(COMMANDS, "trial", interrupted)
    assert main(["trial"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


@pytest.mark.parametrize("command", [["report", "demo"], ["reproduce", "0123abc"]])
def test_a_dead_tracking_server_fails_in_seconds_in_one_line(capsys, command):
    import time

    start = time.monotonic()
    assert main([*command, "tracking.uri=http://127.0.0.1:9"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: tracking.uri=http://127.0.0.1:9 is unreachable within 5 s")
    assert time.monotonic() - start < 15


def test_an_unwritable_artifact_root_is_refused_before_training(capsys, store, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = _trial_error(capsys, store[:1], f"tracking.artifact_root={blocker}/artifacts")
    assert line.startswith(f"error: tracking.artifact_root={blocker}/artifacts cannot be used")


def test_the_local_default_ignores_a_ray_address_left_by_ray_start(tmp_path):
    # A `ray start` (even a dead one) leaves /tmp/ray/ray_current_cluster; the local default must
    # start its own instance rather than join it, or refuse num_cpus.
    address_file = Path("/tmp/ray/ray_current_cluster")
    saved = address_file.read_text() if address_file.exists() else None
    address_file.parent.mkdir(parents=True, exist_ok=True)
    address_file.write_text("127.0.0.1:1")  # nothing listens there
    probe = (
        "from pipeline.study import cluster; from pipeline.config import ClusterConfig\n"
        "print(cluster.start(ClusterConfig(num_cpus=1))['CPU']); cluster.shutdown()"
    )
    try:
        done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    finally:
        if saved is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(saved)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "1.0", done.stderr[-2000:]


def test_rejected_input_leaves_no_folder_behind(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default store and artifact root would appear here
    for bad in (["scale=-1"], ["initializer=nope"], ["optimizer.momentum=2"]):
        assert main(["trial", *bad]) == 2
    assert list(tmp_path.iterdir()) == []
