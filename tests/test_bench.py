"""The throughput benchmark (scripts/bench.py): its input checks, and one small run end to end."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench  # noqa: E402


def test_trial_counts_are_parsed_and_bad_ones_refused():
    assert bench._counts(4)("64, 8") == [64, 8]
    assert bench._counts(1)("") == []
    for bad in ("0", "6", "x", "-4"):
        with pytest.raises(argparse.ArgumentTypeError, match="multiples of 4"):
            bench._counts(4)(bad)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_small_workload_runs_through_both_sides_and_reports_its_figures(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "scripts/bench.py", "--workloads", "4", "--grid", "", "--epochs", "1", "--repeats", "1",
                    "--no-engine", "--no-overhead", "--no-diagnostics", "--json", str(out)], cwd=ROOT, check=True)
    (workload,) = json.loads(out.read_text())["workloads"]
    assert workload["workload"] == "W4" and workload["bare_s"] > 0
    for side in ("batched", "unbatched"):
        assert 0 < workload[side]["ratio"] and 0 < workload[side]["to_first_trial_s"] < workload[side]["wall_s"]
