"""Wheels for a machine that has PyTorch but no package index (an air-gapped GPU box): what the
project needs there that the machine lacks, at this environment's versions, for its Python.

    # there: what it has
    python3 -m pip list --format=freeze > have.txt
    # here: the wheels it lacks, for its Python, Ray's stripped (below)
    python scripts/wheel_bundle.py --python 3.12 --have have.txt --out .whl
    # there: install them beside its own packages, and run
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    #   (or, carried as one --xz archive: mkdir /tmp/whl && tar xJf bundle.tar.xz -C /tmp/whl, then /tmp/whl/*.whl)
    PYTHONPATH=/tmp/site python3 -m pipeline run cluster.gpus_per_trial=0.25

The needs are the project's dependencies (pyproject.toml) walked through this environment's
installed metadata, their markers read for the target's Python on Linux; the versions are the
ones installed here, so the bundle runs what the tests ran. A name in ``--have`` is not bundled,
whatever its version there (``--pin NAME`` bundles it anyway); torch is never bundled.

What a study never loads is stripped: from Ray's wheel (79 MB) its Java jars (32 MB), its
dashboard's web app and the libraries a study does not import (RLlib, Serve, Data, LLM, Tune,
Train, AIR); from MLflow's its UI's web app. ray[default]'s extras are not followed: a study on one
box starts Ray without a dashboard. It prints one line per wheel and the total, and exits 1 where
a wheel is missing for the target. docs/gpu.md gives the sizes for a CUDA image's Python 3.12.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
# Installed with the project but not needed on the target: the GPU build of torch is there, and
# PostgreSQL's driver only serves a team store.
NOT_CARRIED = {"torch", "psycopg2-binary"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
PLATFORMS += ["manylinux_2_24_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64"]
# A study on one box starts a local Ray without its dashboard: ray[default]'s extras serve a cluster.
EXTRAS_DROPPED = {"ray"}
# What a study never loads from these wheels (paths inside them, as prefixes).
UNUSED = {
    "ray": (
        "ray/jars/",
        "ray/rllib/",
        "ray/serve/",
        "ray/data/",
        "ray/llm/",
        "ray/tune/",
        "ray/train/",
        "ray/air/",
        "ray/dashboard/client/",
    ),
    "mlflow": ("mlflow/server/js/",),  # the UI's web app: browse from a machine that has one
}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requirements() -> list[Requirement]:
    """The [project] dependencies of pyproject.toml."""
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as handle:
        return [Requirement(r) for r in tomllib.load(handle)["project"]["dependencies"]]


def needed(python: str, requirements: list[Requirement]) -> dict[str, str]:
    """normalized name -> installed version, for the requirements and what they require in turn
    (their extras too, where a requirement names them), markers read for ``python`` on Linux."""
    env = {**default_environment(), "python_version": python, "python_full_version": f"{python}.0"}
    found: dict[str, str] = {}
    todo = [(r, "") for r in requirements]
    while todo:
        requirement, extra = todo.pop()
        if requirement.marker and not requirement.marker.evaluate({**env, "extra": extra}):
            continue
        name = normalized(requirement.name)
        if name in found or name in NOT_CARRIED:  # the target's torch brings its own needs
            continue
        try:
            found[name] = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{requirement.name} is needed on Python {python} but not installed here") from None
        extras = () if name in EXTRAS_DROPPED else requirement.extras
        for line in metadata.distribution(requirement.name).requires or []:
            todo += [(Requirement(line), wanted) for wanted in ("", *extras)]
    return found


def have_names(path: str | None) -> set[str]:
    """Names from a ``pip list --format=freeze`` (or one name a line) file."""
    if not path:
        return set()
    lines = Path(path).read_text().splitlines()
    return {normalized(re.split(r"[=<>@ ]", line.strip(), maxsplit=1)[0]) for line in lines if line.strip()}


def download(name: str, version: str, python: str, out: Path) -> bool:
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", python, "--implementation", "cp", "-d", str(out)]
    command += [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    done = subprocess.run([*command, f"{name}=={version}"], capture_output=True, text=True)
    return done.returncode == 0 or built_pure(name, version, out)


def built_pure(name: str, version: str, out: Path) -> bool:
    """A wheel built here from the source distribution (antlr4's runtime has none on PyPI), kept
    only if it is pure Python, which installs on any target."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp, f"{name}=={version}"]
        subprocess.run(command, capture_output=True, text=True)
        pure = [wheel for wheel in Path(tmp).glob("*.whl") if wheel.name.endswith("-none-any.whl")]
        for wheel in pure:
            wheel.replace(out / wheel.name)
    if not pure:
        print(f"  {name}=={version}: no wheel for the target's Python, and not pure Python")
    return bool(pure)


def strip_wheel(wheel: Path, unused: tuple[str, ...]) -> None:
    """Rewrite ``wheel`` without the files under ``unused``, its RECORD to match."""
    with tempfile.NamedTemporaryFile(dir=wheel.parent, suffix=".whl", delete=False) as handle:
        stripped = Path(handle.name)
    with (
        zipfile.ZipFile(wheel) as source,
        zipfile.ZipFile(stripped, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dest,
    ):
        for item in source.infolist():
            if item.filename.startswith(unused):
                continue
            content = source.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                rows = content.decode().splitlines(keepends=True)
                content = "".join(row for row in rows if not row.startswith(unused)).encode()
            dest.writestr(item, content)
    stripped.replace(wheel)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default="3.12", help="the target's Python, major.minor")
    ap.add_argument("--have", help="the target's `pip list --format=freeze`: those names are not bundled")
    ap.add_argument("--pin", action="append", default=[], help="bundle this name even if the target has it")
    ap.add_argument("--out", default=".whl", help="the folder the wheels go to")
    ap.add_argument("--xz", metavar="FILE", help="also pack them, uncompressed inside, in one .tar.xz (~half the size)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = have_names(args.have) - {normalized(n) for n in args.pin}
    wanted = {
        name: version for name, version in needed(args.python, project_requirements()).items() if name not in skip
    }
    missing = [name for name, version in sorted(wanted.items()) if not download(name, version, args.python, out)]
    for name, unused in UNUSED.items():
        for wheel in out.glob(f"{name}-*.whl"):
            strip_wheel(wheel, unused)
    wheels = sorted(out.glob("*.whl"))
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:7.1f} MiB  {wheel.name}")
    total = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{len(wheels)} wheels, {total:.1f} MiB in {out}" + (f"; missing: {', '.join(missing)}" if missing else ""))
    if args.xz:
        pack(wheels, Path(args.xz))
        print(f"packed: {Path(args.xz).stat().st_size / 2**20:.1f} MiB in {args.xz}")
    return 1 if missing else 0


def pack(wheels: list[Path], archive: Path) -> None:
    """The wheels stored uncompressed in one xz tarball: xz across all of them takes Ray's
    binaries to about half of what each wheel's own deflate does (unpack there with tar xJf)."""
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(archive, "w:xz", preset=9) as tar:
        for wheel in wheels:
            stored = Path(tmp) / wheel.name
            with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as dest:
                for item in source.infolist():
                    content = source.read(item)
                    item.compress_type = zipfile.ZIP_STORED
                    dest.writestr(item, content)
            tar.add(stored, arcname=wheel.name)
            stored.unlink()


if __name__ == "__main__":
    sys.exit(main())
