"""The tree keeps its shape: layer rules (import-linter contracts in pyproject.toml), ruff's lint and
format, and no comment that narrates history or points outside the repository."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_layer_contracts_hold():
    done = _run(str(BIN / "lint-imports"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "broken" in done.stdout and " 0 broken" in done.stdout  # the contracts ran


@pytest.mark.parametrize("command", [("check", "."), ("format", "--check", ".")], ids=["lint", "format"])
def test_ruff_finds_nothing(command):
    done = _run(str(BIN / "ruff"), *command)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


DATED = re.compile(r"20[0-9][0-9]-[01][0-9]-")


def _text_files() -> list[Path]:
    files = [*ROOT.joinpath("pipeline").rglob("*.py"), ROOT / "README.md", *ROOT.joinpath("docs").glob("*.md")]
    return [path for path in files if "__pycache__" not in path.parts]


def test_no_dated_comment_and_no_reference_outside_the_repository():
    offenders = []
    for path in _text_files():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if DATED.search(line) or "shared/" in line:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
