"""The throughput benchmark (scripts/bench.py): its input checks, and one small run end to end."""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    subprocess.run(
        [
            sys.executable,
            "scripts/bench.py",
            "--workloads",
            "4",
            "--grid",
            "",
            "--epochs",
            "1",
            "--repeats",
            "1",
            "--no-engine",
            "--no-overhead",
            "--no-diagnostics",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        check=True,
    )
    (workload,) = json.loads(out.read_text())["workloads"]
    assert workload["workload"] == "W4" and workload["bare_s"] > 0
    for side in ("batched", "unbatched"):
        assert 0 < workload[side]["ratio"] and 0 < workload[side]["to_first_trial_s"] < workload[side]["wall_s"]


def test_the_resnet_benchmark_times_each_side_in_alternation_and_counts_the_probes():
    # 256 images, 1 epoch: two batches a run; what is checked is the bookkeeping, not the speed.
    threads = torch.get_num_threads()
    try:
        out = bench.resnet_bench(256, 1, "cpu", None, repeats=2, threads=1)
    finally:
        torch.set_num_threads(threads)  # the trials set the process's, which other tests share
    assert list(out["seconds"]) == ["engine", "bare", "engine_no_diagnostics"]
    for clock in ("seconds", "cpu_seconds"):
        assert all(len(times) == 2 and min(times) > 0 for times in out[clock].values())
    assert out["probes"] == 2 and out["probe_share"] == 2.0  # epochs 0 and 1, 256 samples each
    assert out["ratio"] == out["engine"] / out["bare"] > 0 and out["cpu_ratio"] > 0


def test_the_device_benchmark_runs_each_sharing_and_batching_mode(tmp_path):
    """scripts/gpu_bench.py, on the CPU here (the same code runs on a GPU): every (processes, batch) row."""
    out = tmp_path / "gpu.json"
    subprocess.run(
        [
            sys.executable,
            "scripts/gpu_bench.py",
            "--device",
            "cpu",
            "--trials",
            "4",
            "--epochs",
            "1",
            "--procs",
            "1,2",
            "--batch",
            "1,2",
            "--set",
            "model.width=16",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        check=True,
        timeout=240,
    )
    figures = json.loads(out.read_text())
    assert figures["overrides"] == ["model.width=16"]
    rows = figures["rows"]
    assert [(r["procs"], r["batch"]) for r in rows] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(r["trials"] == 4 and r["tpm"] > 0 for r in rows)


def test_the_scale_benchmark_times_ask_and_tell_per_sampler_and_storage(tmp_path):
    """scripts/bench_scale.py --optuna with tiny counts: a median per count, measured, for every
    (sampler, storage); the journal of the last count opened again in a fresh process."""
    out = tmp_path / "scale.json"
    subprocess.run(
        [
            sys.executable,
            "scripts/bench_scale.py",
            "--optuna",
            "--counts",
            "50,100",
            "--samplers",
            "random,grid",
            "--load-from",
            "100",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        check=True,
        timeout=240,
    )
    figures = json.loads(out.read_text())["optuna"]
    runs = {(r["sampler"], r["storage"]): r for r in figures["runs"]}
    assert set(runs) == {(s, t) for s in ("random", "grid") for t in ("journal", "memory")}
    for run in runs.values():
        assert run["trials_run"] == 100 and len(run["curve"]) == 4  # a point per 25 trials (half the least count)
        assert all(at["measured"] and at["ms"] > 0 for at in run["at"].values())
        assert all(ms > 0 for ms in run["progress_bar_ms"].values())
    assert runs["grid", "memory"]["axes"] == ["initializer", "scale", "activation", "normalization", "batch_size"] + [
        "model.depth",
        "model.width",
    ]
    assert figures["journal_load"]["100"]["trials"] == 100


def test_the_report_benchmark_grows_a_real_study_and_times_its_report(tmp_path):
    """scripts/bench_report.py with a 2-trial template run for real, grown to 30 trials: the copies
    are in both stores (MLflow's trial runs with their curves, Optuna's trials) and the report of
    all 30 was timed."""
    out = tmp_path / "report.json"
    subprocess.run(
        [sys.executable, "scripts/bench_report.py", "--trials", "30", "--template", "2", "--keep", "--json", str(out)],
        cwd=ROOT,
        check=True,
        timeout=300,
    )
    (study,) = json.loads(out.read_text())["studies"]
    folder = Path(study["folder"])
    try:
        assert study["grown_trials"] == 28 and study["report"]["rc"] == 0
        assert study["report"]["wall_s"] > 0 and study["report"]["cpu_s"] > 0 and study["report"]["peak_rss_mb"] > 100
        page = (folder / "studies" / "reportbench" / "report" / "report.html").read_text()
        assert "<p>30 trials, 30 runs" in page and "Figure skipped: no run" not in page
        con = sqlite3.connect(f"file:{folder / 'mlflow.db'}?mode=ro", uri=True)
        (curves,) = con.execute(
            "SELECT COUNT(DISTINCT run_uuid) FROM metrics WHERE key = 'val_accuracy' AND run_uuid IN "
            "(SELECT run_uuid FROM tags WHERE key = 'initstudy.role' AND value = 'trial')"
        ).fetchone()
        con.close()
        assert curves == 30
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_the_writers_benchmark_times_every_process_count_it_is_given(tmp_path):
    """scripts/bench_scale.py --writers: a real tiny trial's journal written N times through 0 and 1
    writer processes, each count's rate and CPU a run measured."""
    out = tmp_path / "writers.json"
    subprocess.run(
        [sys.executable, "scripts/bench_scale.py", "--writers", "30", "--writer-counts", "0,1", "--json", str(out)],
        cwd=ROOT,
        check=True,
        timeout=240,
    )
    figures = json.loads(out.read_text())["writers"]
    assert set(figures) == {"0", "1"}
    assert all(f["runs_per_s"] > 0 and f["writer_cpu_ms_per_run"] > 0 for f in figures.values())


def test_the_pipeline_benchmark_repeats_a_real_study_and_gives_the_median_and_range(tmp_path):
    """scripts/bench_scale.py --pipeline N --repeat K: the whole `pipeline run` K times, each run's
    rate and integrity (every trial a FINISHED child run with its whole curve), then their median."""
    out = tmp_path / "pipeline.json"
    command = [sys.executable, "scripts/bench_scale.py", "--pipeline", "30", "--repeat", "2", "--json", str(out)]
    printed = subprocess.run(command, cwd=ROOT, check=True, timeout=400, capture_output=True, text=True).stdout
    figures = json.loads(out.read_text())["pipeline"]
    rates = [run["trials_per_s"] for run in figures["runs"]]
    assert len(rates) == 2 and all(run["integrity"]["ok"] for run in figures["runs"])
    assert figures["min_trials_per_s"] == min(rates) <= figures["median_trials_per_s"] <= max(rates)
    assert f"2 runs: median {figures['median_trials_per_s']:.1f} trials/s" in printed
