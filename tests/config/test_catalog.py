"""pipeline/config/catalog.py: what a config may name, known without PyTorch, is exactly what is implemented;
and a study's driver, which checks every trial with it, never imports PyTorch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, catalog, config_from_dict, validate
from pipeline.config.composition import compose
from pipeline.config.registry import Registry

ROOT = Path(__file__).resolve().parents[2]
DECLARED = {
    r.kind: r
    for r in (
        catalog.INITIALIZERS,
        catalog.ACTIVATIONS,
        catalog.NORMALIZATIONS,
        catalog.MODELS,
        catalog.DATASETS,
        catalog.OPTIMIZERS,
    )
}


@pytest.mark.parametrize("kind", sorted(DECLARED))
def test_every_declared_name_and_alias_has_its_implementation(kind):
    registry = DECLARED[kind]
    for name in registry.names(aliases=True):
        assert registry.get(name) is registry.get(registry.canonical(name))  # imports its module on first use
    # (and ``add`` refuses a name the catalog does not declare: tested below)


def test_an_implementation_must_register_a_declared_name_with_its_declared_aliases():
    registry = Registry("widget", "nowhere")
    registry.declare("spanner", "wrench")
    with pytest.raises(ValueError, match="not declared .* pipeline/config/catalog.py"):
        registry.add("hammer", object())
    with pytest.raises(ValueError, match="not declared .* pipeline/config/catalog.py"):
        registry.add("spanner", object())  # its alias left out
    registry.add("spanner", 1, "wrench")
    assert registry.get("wrench") == 1 and registry.names(aliases=True) == ["spanner", "wrench"]
    with pytest.raises(ValueError, match="twice"):
        registry.add("spanner", 2, "wrench")
    with pytest.raises(ConfigError, match="unknown widget 'saw'; valid: spanner, wrench"):
        registry.canonical("saw")


def test_a_declared_name_is_known_before_its_module_is_imported_and_get_imports_it():
    code = (
        "import sys\n"
        "from pipeline.config.catalog import INITIALIZERS\n"
        "assert INITIALIZERS.canonical('glorot_uniform') == 'xavier_uniform'\n"
        "assert 'torch' not in sys.modules and 'pipeline.engine.nn.initializers' not in sys.modules\n"
        "INITIALIZERS.get('orthogonal')\n"
        "assert 'pipeline.engine.nn.initializers' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_maxout_pieces_are_checked_with_the_rest_of_the_config():
    cfg = config_from_dict(compose(["activation=maxout", "activation.pieces=0"]))
    with pytest.raises(ConfigError, match="activation.pieces=0 is invalid"):
        validate(cfg)
    assert (
        catalog.activation_widening(config_from_dict(compose(["activation=maxout", "activation.pieces=3"])).activation)
        == 3
    )
    assert catalog.activation_widening(config_from_dict(compose(["activation=swish"])).activation) == 1


def test_a_study_driver_never_imports_pytorch(tmp_path):
    """Validation, batching keys, Ray, Optuna, MLflow, the summary and the report: all without
    torch in the driver (1.5 s of its start-up, before Ray could start); the workers train."""
    code = (
        "import sys\n"
        "from pipeline.cli import main\n"
        f"rc = main(['run', 'study.n_trials=4', 'train.epochs=1', 'study.name=light', 'study.trial_batch_max=2',\n"
        f"           'tracking.uri=sqlite:///{tmp_path}/mlflow.db', 'tracking.artifact_root={tmp_path}/artifacts',\n"
        f"           'study.output_dir={tmp_path}/studies'])\n"
        "print('rc', rc, 'torch' in sys.modules, 'pipeline.engine.nn.models' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip().splitlines()[-1] == "rc 0 False False", done.stderr[-2000:]
    assert (tmp_path / "studies" / "light" / "report" / "report.html").is_file()


def test_a_warmed_up_worker_imports_nothing_more_of_ours_for_its_first_trial(tmp_path):
    """The driver never imports the trial runner, so a worker must: its warm-up (while the driver
    sets up) imports every module of ours that a trial uses, not the first trial (0.3 s)."""
    code = (
        "import sys\n"
        "from pipeline.config.composition import compose\n"
        "from pipeline.record.journal import journal_starter\n"
        f"config = compose(['train.epochs=1', 'tracking.layer_plot=false', 'tracking.uri=sqlite:///{tmp_path}/m.db'])\n"
        "from pipeline.study.worker import warm_up\n"  # what the driver sent a worker: a composed config
        "warm_up()\n"
        "before = set(sys.modules)\n"
        "from pipeline.record.runner import TrialRequest, run_recorded_batch\n"
        "run_recorded_batch([TrialRequest(config, 'warm')], journal_starter(lambda key, ops: None))\n"
        "print(sorted(m for m in set(sys.modules) - before if m.startswith('pipeline')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stderr[-2000:]
