"""Throughput benchmark: the whole `python -m pipeline run` against a bare PyTorch loop.

Workload W<N>: N trials x E epochs, MLP depth 4 width 128 on digits, the five axes sampled at
random (batch sizes 32/64/128), SGD. Both sides run as whole processes (start-up included) with
the same number of worker processes, and each figure is the median of --repeats runs.

    python scripts/bench.py                       # W16 and W64, 1-epoch overhead, diagnostics cost
    python scripts/bench.py --memory-trials 500   # plus driver memory over 500 tiny trials

Prints trials/min for each side and their ratio, the fixed per-trial overhead, the time from
command to first trial running, the cost of diagnostics as a share of trial time and, with
--memory-trials, the driver's memory growth and the number of child runs recorded.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INITS = ["xavier_normal", "kaiming_normal", "lecun_normal", "orthogonal", "normal"]
ACTS = ["relu", "tanh", "leaky_relu"]


# ---------------------------------------------------------------- the bare loop (no recording)
def bare_trial(params: dict, epochs: int) -> float:
    """One trial in plain PyTorch: whole-tensor data, index batches, SGD. Returns val accuracy."""
    import torch
    from torch import nn

    torch.set_num_threads(1)
    x, y = _digits()
    gen = torch.Generator().manual_seed(params["seed"])
    layers, width, fan_in = [], 128, x.shape[1]
    for _ in range(4):
        linear = nn.Linear(fan_in, width)
        _init(linear.weight, params, gen)
        nn.init.zeros_(linear.bias)
        norm = nn.BatchNorm1d(width) if params["normalization"] == "batch" else nn.Identity()
        act = {"relu": nn.ReLU(), "tanh": nn.Tanh(), "leaky_relu": nn.LeakyReLU(0.01)}[params["activation"]]
        layers += [linear, norm, act]
        fan_in = width
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    n_train = 1079
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(n_train, generator=gen).split(params["batch_size"]):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(x[n_train:]).argmax(1) == y[n_train:]).float().mean().item()
    return acc


def _init(weight, params: dict, gen) -> None:
    import math

    from torch import nn

    s, name = params["scale"], params["initializer"]
    if name == "orthogonal":
        nn.init.orthogonal_(weight, gain=s, generator=gen)
        return
    fan_in, fan_out = weight.shape[1], weight.shape[0]
    std = {"xavier_normal": math.sqrt(2 / (fan_in + fan_out)), "kaiming_normal": math.sqrt(2 / fan_in),
           "lecun_normal": math.sqrt(1 / fan_in), "normal": 0.01}[name]
    nn.init.normal_(weight, 0.0, std * s, generator=gen)


_DATA = None


def _digits():
    global _DATA
    if _DATA is None:
        import torch
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor((d.data - d.data[:1079].mean(0)) / (d.data[:1079].std(0) + 1e-8), dtype=torch.float32)
        _DATA = (x, torch.tensor(d.target))
    return _DATA


def bare_main(trials: int, epochs: int, procs: int) -> None:
    rng = random.Random(0)
    params = [{"initializer": rng.choice(INITS), "scale": 2 ** rng.uniform(-2, 2), "activation": rng.choice(ACTS),
               "normalization": rng.choice(["none", "batch"]), "batch_size": rng.choice([32, 64, 128]), "seed": i}
              for i in range(trials)]
    with mp.get_context("spawn").Pool(procs) as pool:
        pool.starmap(bare_trial, [(p, epochs) for p in params])


# ---------------------------------------------------------------- measurements
def timed(cmd: list[str], env=None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def bare_wall(trials: int, epochs: int, procs: int) -> float:
    return timed([sys.executable, __file__, "--bare", "--trials", str(trials), "--epochs", str(epochs), "--procs", str(procs)])


def pipeline_cmd(tmp: Path, name: str, trials: int, epochs: int, extra=()) -> list[str]:
    return [sys.executable, "-m", "pipeline", "run", f"study.name={name}", f"study.n_trials={trials}",
            f"train.epochs={epochs}", "study.sampler=random", "study.progress=false", "study.report=false",
            f"study.output_dir={tmp}/studies", f"tracking.uri=sqlite:///{tmp}/mlflow.db",
            f"tracking.artifact_root={tmp}/artifacts", *extra]


def pipeline_wall(tmp: Path, name: str, trials: int, epochs: int, extra=()) -> tuple[float, float]:
    """Whole-command wall time, and seconds from the command's start to the first trial's run."""
    start_ms = time.time() * 1000
    wall = timed(pipeline_cmd(tmp, name, trials, epochs, extra))
    return wall, (_first_child_start(tmp, name) - start_ms) / 1000


def _first_child_start(tmp: Path, name: str) -> float:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], "tags.`initstudy.role` = 'trial'", max_results=5000)
    return min(r.info.start_time for r in runs)


def _count_children(tmp: Path, name: str) -> tuple[int, int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], "tags.`initstudy.role` = 'trial'", max_results=5000)
    return len(runs), sum(r.info.status == "RUNNING" for r in runs)


def throughput(trials: int, epochs: int, procs: int, repeats: int) -> dict:
    bare, pipe, first = [], [], []
    for i in range(repeats):
        bare.append(bare_wall(trials, epochs, procs))
        with tempfile.TemporaryDirectory() as tmp:
            wall, to_first = pipeline_wall(Path(tmp), f"bench{i}", trials, epochs)
        pipe.append(wall)
        first.append(to_first)
    b, p = statistics.median(bare), statistics.median(pipe)
    return {"trials": trials, "epochs": epochs, "bare_s": b, "pipeline_s": p, "bare_tpm": 60 * trials / b,
            "pipeline_tpm": 60 * trials / p, "ratio": b / p, "to_first_trial_s": statistics.median(first),
            "bare_runs": bare, "pipeline_runs": pipe}


def diagnostics_cost(repeats: int) -> dict:
    """In-process, one thread: the same trial with diagnostics on and off."""
    import torch

    sys.path.insert(0, str(ROOT))
    from pipeline.compose import compose
    from pipeline.train import run_trial

    torch.set_num_threads(1)
    times = {}
    for diag in (True, False):
        config = compose([f"train.diagnostics={str(diag).lower()}", "train.threads=1"])
        run_trial(config)  # warm-up
        times[diag] = statistics.median(_time(lambda: run_trial(config)) for _ in range(repeats))
    return {"with_s": times[True], "without_s": times[False], "share": (times[True] - times[False]) / times[True]}


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def driver_memory(trials: int) -> dict:
    """Driver RSS over a study of many tiny trials, sampled every 0.5 s."""
    import psutil

    with tempfile.TemporaryDirectory() as tmp:
        cmd = pipeline_cmd(Path(tmp), "memory", trials, 1, ["model.depth=1", "model.width=8", "tracking.log_weights=false"])
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        samples, start = [], time.perf_counter()
        while proc.poll() is None:
            try:
                samples.append(psutil.Process(proc.pid).memory_info().rss / 2**20)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.5)
        wall = time.perf_counter() - start
        children, running = _count_children(Path(tmp), "memory")
    settled = samples[min(len(samples) - 1, 20):]  # after start-up (10 s)
    return {"trials": trials, "wall_s": wall, "rss_after_startup_mb": settled[0], "rss_max_mb": max(samples),
            "growth_mb": max(settled) - settled[0], "child_runs": children, "running_left": running}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--procs", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workloads", default="16,64", help="trial counts to measure, e.g. 16,64")
    ap.add_argument("--memory-trials", type=int, default=0)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    if args.bare:
        return bare_main(args.trials, args.epochs, args.procs)
    report = {"machine": f"{os.cpu_count()} CPUs", "workloads": []}
    for n in map(int, args.workloads.split(",")):
        report["workloads"].append(throughput(n, args.epochs, args.procs, args.repeats))
        _print_workload(report["workloads"][-1])
    one = throughput(32, 1, args.procs, args.repeats)
    report["overhead_per_trial_s"] = (one["pipeline_s"] - one["bare_s"]) * args.procs / 32
    print(f"fixed overhead per trial (32 x 1-epoch trials, {args.procs} slots): {report['overhead_per_trial_s']:.3f} s"
          f"  [pipeline {one['pipeline_s']:.1f} s vs bare {one['bare_s']:.1f} s, start-up included]")
    report["diagnostics"] = diagnostics_cost(args.repeats)
    d = report["diagnostics"]
    print(f"diagnostics: {100 * d['share']:.1f}% of trial time ({d['with_s']:.3f} s with, {d['without_s']:.3f} s without)")
    if args.memory_trials:
        report["memory"] = m = driver_memory(args.memory_trials)
        print(f"driver memory over {m['trials']} tiny trials: {m['rss_after_startup_mb']:.0f} MB after start-up, "
              f"max {m['rss_max_mb']:.0f} MB, growth {m['growth_mb']:.0f} MB; {m['child_runs']} child runs "
              f"({m['running_left']} RUNNING), {m['wall_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def _print_workload(w: dict) -> None:
    print(f"W{w['trials']} ({w['trials']} trials x {w['epochs']} epochs): bare {w['bare_s']:.1f} s "
          f"({w['bare_tpm']:.0f} trials/min), pipeline {w['pipeline_s']:.1f} s ({w['pipeline_tpm']:.0f} trials/min), "
          f"ratio {w['ratio']:.2f}; command to first trial {w['to_first_trial_s']:.1f} s")


if __name__ == "__main__":
    main()
