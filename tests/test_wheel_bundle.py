"""scripts/wheel_bundle.py: which wheels an air-gapped GPU box is sent, and how Ray's is stripped.

The download itself needs the package index; these parts do not."""

from __future__ import annotations

import sys
import tarfile
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import wheel_bundle  # noqa: E402


def test_needs_follow_the_project_down_to_what_the_study_imports():
    found = wheel_bundle.needed("3.12", wheel_bundle.project_requirements())
    assert {"ray", "mlflow", "mlflow-skinny", "optuna", "hydra-core", "sqlalchemy", "alembic"} <= set(found)
    assert "torch" not in found and "sympy" not in found  # the target's torch brings its own needs
    assert "opencensus" not in found and "py-spy" not in found  # ray[default]'s extras: a cluster's dashboard


def test_markers_are_read_for_the_targets_python():
    requirement = Requirement('packaging; python_version < "3.11"')
    assert "packaging" in wheel_bundle.needed("3.10", [requirement])
    assert "packaging" not in wheel_bundle.needed("3.12", [requirement])


def test_the_targets_list_is_read_with_or_without_versions(tmp_path):
    listing = tmp_path / "have.txt"
    listing.write_text("PyYAML==6.0.2\nscikit_learn\ntorch @ file:///wheels/torch.whl\n\n")
    assert wheel_bundle.have_names(str(listing)) == {"pyyaml", "scikit-learn", "torch"}


def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    record = "".join(f"{name},sha256=x,{len(content)}\n" for name, content in files.items())
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, content in files.items():
            wheel.writestr(name, content)
        wheel.writestr("ray-2.60.0.dist-info/RECORD", record + "ray-2.60.0.dist-info/RECORD,,\n")
    return path


def test_stripping_drops_the_unused_files_and_their_record_lines(tmp_path):
    files = {"ray/__init__.py": b"x = 1\n", "ray/jars/ray_dist.jar": b"\0" * 1000, "ray/rllib/a.py": b"y = 2\n"}
    wheel = _wheel(tmp_path / "ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl", files)
    wheel_bundle.strip_wheel(wheel, wheel_bundle.UNUSED["ray"])
    with zipfile.ZipFile(wheel) as stripped:
        assert stripped.namelist() == ["ray/__init__.py", "ray-2.60.0.dist-info/RECORD"]
        assert stripped.read("ray/__init__.py") == b"x = 1\n"
        record = stripped.read("ray-2.60.0.dist-info/RECORD").decode()
    assert "ray/__init__.py" in record and "jars" not in record and "rllib" not in record


def test_the_packed_archive_holds_each_wheel_whole(tmp_path):
    files = {"ray/__init__.py": b"x = 1\n" * 100}
    wheel = _wheel(tmp_path / "ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl", files)
    wheel_bundle.pack([wheel], tmp_path / "bundle.tar.xz")
    with tarfile.open(tmp_path / "bundle.tar.xz") as tar:
        tar.extractall(tmp_path / "out", filter="data")
    with zipfile.ZipFile(tmp_path / "out" / wheel.name) as unpacked:
        assert unpacked.testzip() is None and unpacked.read("ray/__init__.py") == files["ray/__init__.py"]
        assert all(item.compress_type == zipfile.ZIP_STORED for item in unpacked.infolist())
