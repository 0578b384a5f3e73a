"""Throughput benchmark: the whole `python -m pipeline run` against a bare PyTorch loop.

Workload W<N>: N trials x E epochs, MLP depth 4 width 128 on digits, the five axes sampled at
random (batch sizes 32/64/128), SGD. Both sides run as whole processes (start-up included) with
the same number of worker processes, and each figure is the median of --repeats runs.

    python scripts/bench.py                       # W16 and W64, 1-epoch overhead, diagnostics cost
    python scripts/bench.py --memory-trials 500   # plus driver memory over 500 tiny trials
    python scripts/bench.py --resnet              # only ResNet-20 / CIFAR-10: engine vs bare loop (~15 min)

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
from typing import Optional

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
    std = {
        "xavier_normal": math.sqrt(2 / (fan_in + fan_out)),
        "kaiming_normal": math.sqrt(2 / fan_in),
        "lecun_normal": math.sqrt(1 / fan_in),
        "normal": 0.01,
    }[name]
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


def random_params(trials: int) -> list[dict]:
    rng = random.Random(0)
    return [
        {
            "initializer": rng.choice(INITS),
            "scale": 2 ** rng.uniform(-2, 2),
            "activation": rng.choice(ACTS),
            "normalization": rng.choice(["none", "batch"]),
            "batch_size": rng.choice([32, 64, 128]),
            "seed": i,
        }
        for i in range(trials)
    ]


#: The grid workload: initializer x scale (4 x trials/4), ReLU, no normalization, batch size 64.
GRID_INITS = ["xavier_normal", "kaiming_normal", "lecun_normal", "orthogonal"]


def grid_scales(trials: int) -> list[float]:
    n = trials // len(GRID_INITS)
    return [round(2 ** (-2 + 4 * i / max(n - 1, 1)), 4) for i in range(n)]


def grid_params(trials: int) -> list[dict]:
    return [
        {
            "initializer": init,
            "scale": scale,
            "activation": "relu",
            "normalization": "none",
            "batch_size": 64,
            "seed": 0,
        }
        for init in GRID_INITS
        for scale in grid_scales(trials)
    ]


def grid_configs(trials: int, epochs: int, *extra: str) -> list[dict]:
    """The grid's trials as the trial engine's configs (one thread each), ``extra`` overrides added."""
    from pipeline.config.composition import compose

    return [
        compose(
            [
                f"initializer={p['initializer']}",
                f"scale={p['scale']}",
                "activation=relu",
                "normalization=none",
                "batch_size=64",
                f"train.epochs={epochs}",
                "train.threads=1",
                *extra,
            ]
        )
        for p in grid_params(trials)
    ]


def grid_overrides(trials: int) -> list[str]:
    scales = ", ".join(str(s) for s in grid_scales(trials))
    return [
        "space=empty",
        "study.sampler=grid",
        f"space.initializer=choice({', '.join(GRID_INITS)})",
        f"space.scale=choice({scales})",
        "activation=relu",
        "normalization=none",
        "batch_size=64",
    ]


def bare_main(trials: int, epochs: int, procs: int, grid: bool = False) -> None:
    params = grid_params(trials) if grid else random_params(trials)
    with mp.get_context("spawn").Pool(procs) as pool:
        pool.starmap(bare_trial, [(p, epochs) for p in params])


# ---------------------------------------------------------------- measurements
def timed(cmd: list[str], env=None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def bare_wall(trials: int, epochs: int, procs: int, grid: bool = False) -> float:
    return timed(
        [
            sys.executable,
            __file__,
            "--bare",
            "--trials",
            str(trials),
            "--epochs",
            str(epochs),
            "--procs",
            str(procs),
            *(["--grid-bare"] if grid else []),
        ]
    )


def pipeline_cmd(tmp: Path, name: str, trials: int, epochs: int, extra=()) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline",
        "run",
        f"study.name={name}",
        f"study.n_trials={trials}",
        f"train.epochs={epochs}",
        "study.sampler=random",
        *extra,
        "study.progress=false",
        "study.report=false",
        f"study.output_dir={tmp}/studies",
        f"tracking.uri=sqlite:///{tmp}/mlflow.db",
        f"tracking.artifact_root={tmp}/artifacts",
    ]


def pipeline_wall(tmp: Path, name: str, trials: int, epochs: int, extra=()) -> dict:
    """Whole-command wall time; seconds from the command's start to the first trial's run; and the
    training phase (first trial's run opened to last one ended)."""
    start_ms = time.time() * 1000
    wall = timed(pipeline_cmd(tmp, name, trials, epochs, extra))
    first, last = _child_span(tmp, name)
    return {"wall": wall, "to_first": (first - start_ms) / 1000, "phase": (last - first) / 1000}


def _child_span(tmp: Path, name: str) -> tuple[float, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], "tags.`initstudy.role` = 'trial'", max_results=5000)
    return min(r.info.start_time for r in runs), max(r.info.end_time for r in runs)


def _count_children(tmp: Path, name: str) -> tuple[int, int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], "tags.`initstudy.role` = 'trial'", max_results=5000)
    return len(runs), sum(r.info.status == "RUNNING" for r in runs)


def throughput(trials: int, epochs: int, procs: int, repeats: int, grid: bool = False) -> dict:
    """Bare loop, pipeline with trial batching (the default) and without, each ``repeats`` times."""
    extra = grid_overrides(trials) if grid else []
    runs: dict[str, list] = {"bare": [], "batched": [], "unbatched": []}
    for i in range(repeats):
        runs["bare"].append(bare_wall(trials, epochs, procs, grid))
        for side, flag in (("batched", "true"), ("unbatched", "false")):
            with tempfile.TemporaryDirectory() as tmp:
                runs[side].append(
                    pipeline_wall(Path(tmp), f"bench{i}", trials, epochs, [*extra, f"study.trial_batching={flag}"])
                )
    bare = statistics.median(runs["bare"])
    out = {
        "workload": f"{'grid' if grid else 'W'}{trials}",
        "trials": trials,
        "epochs": epochs,
        "bare_s": bare,
        "bare_tpm": 60 * trials / bare,
        "runs": runs,
    }
    for side in ("batched", "unbatched"):
        wall = statistics.median(r["wall"] for r in runs[side])
        phase = statistics.median(r["phase"] for r in runs[side])
        out[side] = {
            "wall_s": wall,
            "tpm": 60 * trials / wall,
            "ratio": bare / wall,
            "phase_tpm": 60 * trials / phase,
            "to_first_trial_s": statistics.median(r["to_first"] for r in runs[side]),
        }
    return out


def engine(trials: int, epochs: int, repeats: int) -> dict:
    """In-process, one thread, nothing recorded: the grid's trials through the bare loop, the
    trial engine one by one, and the trial engine batched (one vectorized model for all)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from pipeline.engine.batched import train_batch
    from pipeline.engine.train import prepare_trial, train_trial

    torch.set_num_threads(1)
    params = grid_params(trials)
    configs = grid_configs(trials, epochs)
    sides = {
        "bare": lambda: [bare_trial(p, epochs) for p in params],
        "alone": lambda: [train_trial(prepare_trial(c)) for c in configs],
        "batched": lambda: train_batch([prepare_trial(c) for c in configs]),
    }
    sides["bare"]()  # warm-up: imports, data, the first optimizer
    out = {name: statistics.median(_time(run) for _ in range(repeats)) for name, run in sides.items()}
    print(
        f"engine, one thread, nothing recorded ({trials} grid trials x {epochs} epochs): bare loop {out['bare']:.1f} s, "
        f"trial engine one by one {out['alone']:.1f} s, batched {out['batched']:.1f} s "
        f"({out['bare'] / out['batched']:.2f}x the bare loop's trials/min)"
    )
    out["ceiling"] = ceiling(params[0], configs[0], epochs, out["bare"] / trials)
    return out


def ceiling(params: dict, config: dict, epochs: int, bare_per_trial_s: float) -> dict:
    """The most any batching can give on this CPU: a trial's matmul arithmetic (counted by
    PyTorch's FlopCounterMode) at the batched engine's matmul rate is a floor on its time.

    The engine's trial also evaluates every epoch and runs the diagnostics probe, so its floor is
    above the bare loop's; bare time over the engine's floor bounds the speed-up batching can reach.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.engine.train import prepare_trial, train_trial

    counts = {}
    for side, run in (
        ("bare", lambda: bare_trial(params, epochs)),
        ("engine", lambda: train_trial(prepare_trial(config))),
    ):
        with FlopCounterMode(display=False) as counter:
            run()
        counts[side] = counter.get_total_flops()
    h, w = torch.randn(32, 64, 128), torch.randn(32, 128, 128)  # 32 members, batch 64, width 128
    rate = 2 * h.numel() * w.shape[-1] / statistics.median(_time(lambda: torch.bmm(h, w)) for _ in range(200))
    floor = counts["engine"] / rate
    out = {
        "bare_gflop": counts["bare"] / 1e9,
        "engine_gflop": counts["engine"] / 1e9,
        "bmm_gflops": rate / 1e9,
        "engine_floor_s": floor,
        "max_speedup": bare_per_trial_s / floor,
    }
    print(
        f"arithmetic ceiling: a trial is {out['bare_gflop']:.2f} GFLOP of matmuls in the bare loop, "
        f"{out['engine_gflop']:.2f} in the engine (evaluation each epoch, diagnostics probe); batched matmuls run at "
        f"{out['bmm_gflops']:.0f} GFLOP/s on one thread here, so a trial takes at least {1000 * floor:.0f} ms against "
        f"{1000 * bare_per_trial_s:.0f} ms in the bare loop: batching can reach {out['max_speedup']:.2f}x at most on this CPU"
    )
    return out


def overhead(procs: int, repeats: int) -> dict:
    """Fixed cost per trial, from 1-epoch trials (batching off, so each trial pays it).

    Two figures: start-up included (32 trials, against the bare loop's 32), and once trials run:
    a pipeline trial's share of the training phase against the bare loop's cost of one trial. That
    cost comes two ways: the bare loop's wall time for 64 trials less that for 32 (whole processes
    in parallel, as the pipeline's slots run, but a difference of two noisy timings), and the same
    trials timed in this process (steady, but alone on the machine: a little cheaper).
    """
    bare32, bare64, pipe = [], [], []
    for i in range(repeats):
        bare32.append(bare_wall(32, 1, procs))
        bare64.append(bare_wall(64, 1, procs))
        with tempfile.TemporaryDirectory() as tmp:
            pipe.append(pipeline_wall(Path(tmp), f"one{i}", 32, 1, ["study.trial_batching=false"]))
    b, b64 = statistics.median(bare32), statistics.median(bare64)
    p = statistics.median(r["wall"] for r in pipe)
    phase = statistics.median(r["phase"] for r in pipe) * procs / 32
    slope, alone = (b64 - b) * procs / 32, _bare_trial_in_process(repeats)
    out = {
        "per_trial_s": (p - b) * procs / 32,
        "pipeline_s": p,
        "bare_s": b,
        "phase_per_trial_s": phase,
        "bare_per_trial_s": slope,
        "bare_in_process_s": alone,
        "running_overhead_s": phase - slope,
        "running_overhead_in_process_s": phase - alone,
    }
    print(
        f"fixed overhead per trial (32 x 1-epoch trials, {procs} slots, start-up included): {out['per_trial_s']:.3f} s "
        f"[pipeline {p:.1f} s vs bare {b:.1f} s]; once trials run, a 1-epoch trial takes {phase:.3f} s a slot "
        f"against {slope:.3f} s in the bare loop (whole-process slope; {alone:.3f} s timed in-process): "
        f"{out['running_overhead_s']:.3f} s of overhead ({out['running_overhead_in_process_s']:.3f} s)"
    )
    return out


def _bare_trial_in_process(repeats: int) -> float:
    """Seconds per 1-epoch bare trial, the overhead workload's 32 trials timed in this process."""
    params = random_params(32)
    bare_trial(params[0], 1)  # warm-up: imports, data, the first optimizer
    runs = [_time(lambda: [bare_trial(p, 1) for p in params]) for _ in range(repeats)]
    return statistics.median(runs) / len(params)


def diagnostics_cost(repeats: int) -> dict:
    """In-process, one thread: the default trial with diagnostics on and off, run alternately (so
    drifting machine speed hits both sides), 7 pairs per repeat; the probe's schedule as configured
    (``train.probe_schedule``: log by default) and, for comparison, every epoch."""
    import torch

    sys.path.insert(0, str(ROOT))
    from pipeline.config.composition import compose
    from pipeline.engine.train import run_trial

    torch.set_num_threads(1)
    out = {}
    for schedule in ("log", "every"):
        configs = {
            diag: compose(
                [f"train.diagnostics={str(diag).lower()}", f"train.probe_schedule={schedule}", "train.threads=1"]
            )
            for diag in (True, False)
        }
        for config in configs.values():
            run_trial(config)  # warm-up
        times = {True: [], False: []}
        for _ in range(7 * repeats):
            for diag, config in configs.items():
                times[diag].append(_time(lambda: run_trial(config)))
        with_s, without_s = statistics.median(times[True]), statistics.median(times[False])
        out[schedule] = {"with_s": with_s, "without_s": without_s, "share": (with_s - without_s) / with_s}
    out["log, batched x16"] = _batched_diagnostics_cost(repeats)
    return out


def _batched_diagnostics_cost(repeats: int, members: int = 16) -> dict:
    """The same for a batch of grid trials trained together (the default schedule): batching
    cheapens training steps more than the probe, so the probe's share grows."""
    from pipeline.config.composition import compose
    from pipeline.engine.batched import train_batch
    from pipeline.engine.train import prepare_trial

    params = grid_params(members)
    configs = {
        diag: [
            compose(
                [
                    f"initializer={p['initializer']}",
                    f"scale={p['scale']}",
                    "train.threads=1",
                    f"train.diagnostics={str(diag).lower()}",
                ]
            )
            for p in params
        ]
        for diag in (True, False)
    }
    for batch in configs.values():
        train_batch([prepare_trial(c) for c in batch[:2]])  # warm-up
    times = {True: [], False: []}
    for _ in range(2 * repeats):
        for diag, batch in configs.items():
            preps = [prepare_trial(c) for c in batch]
            times[diag].append(_time(lambda: train_batch(preps)))
    with_s, without_s = statistics.median(times[True]), statistics.median(times[False])
    return {"with_s": with_s, "without_s": without_s, "share": (with_s - without_s) / with_s}


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _rss_mb(pid: int):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def driver_memory(trials: int) -> dict:
    """Driver RSS over a study of many tiny trials, sampled every 0.5 s (Linux: /proc)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = pipeline_cmd(
            Path(tmp), "memory", trials, 1, ["model.depth=1", "model.width=8", "tracking.log_weights=false"]
        )
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        samples, start = [], time.perf_counter()
        while proc.poll() is None:
            rss = _rss_mb(proc.pid)
            if rss is not None:
                samples.append(rss)
            time.sleep(0.5)
        wall = time.perf_counter() - start
        children, running = _count_children(Path(tmp), "memory")
    settled = samples[min(len(samples) - 1, 30) :]  # after start-up (15 s)
    return {
        "trials": trials,
        "wall_s": wall,
        "rss_after_startup_mb": settled[0],
        "rss_max_mb": max(samples),
        "growth_mb": max(settled) - settled[0],
        "child_runs": children,
        "running_left": running,
    }


def _counts(multiple: int):
    """An argparse type: comma-separated positive trial counts, each a multiple of ``multiple``."""

    def parse(text: str) -> list[int]:
        counts = [int(part) if part.strip().isdigit() else -1 for part in text.split(",") if part.strip()]
        if any(n <= 0 or n % multiple for n in counts):
            raise argparse.ArgumentTypeError(
                f"{text!r}: trial counts must be positive integers"
                + (f" and multiples of {multiple}" if multiple > 1 else "")
                + " ('' for none)"
            )
        return counts

    return parse


# ---------------------------------------------------------------- ResNet-20 on CIFAR-10: engine vs bare loop
def _cifar_files(folder: Path, images: int, root: Optional[str]) -> str:
    """CIFAR-10's binary batches: the real ones under ``root`` if given, else random pixels in
    the real format (throughput does not depend on what the pixels show)."""
    if root:
        return root
    import numpy as np

    rng, per_batch = np.random.default_rng(0), int(images / 0.9 / 5) + 1  # 10% become validation
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        records = rng.integers(0, 256, (per_batch, 3073), dtype=np.uint8)
        records[:, 0] %= 10
        (folder / name).write_bytes(records.tobytes())
    return str(folder)


def _resnet_config(root: str, images: int, epochs: int, device: str, diagnostics: bool, threads: Optional[int]) -> dict:
    sys.path.insert(0, str(ROOT))
    from pipeline.config.composition import compose

    return compose([
        "dataset=cifar10", f"dataset.root={root}", "dataset.download=false", f"dataset.max_train={images}",
        "dataset.augment=true", "dataset.input_norm=channel", "model=resnet", "model.depth=20",
        "normalization=batch", "batch_size=128", "optimizer.lr=0.1", f"train.epochs={epochs}",
        f"train.diagnostics={str(diagnostics).lower()}", f"train.device={device}",
        f"train.threads={threads or 'null'}",
    ])  # fmt: skip


def _bare_resnet_loop(prep, epochs: int) -> None:
    """The same model, data (tensors on the device) and augmentation, in plain PyTorch: shuffled
    index batches, SGD, and a validation pass per epoch, as any training loop has."""
    import torch
    import torch.nn.functional as F

    from pipeline.engine.augment import augment_images

    model, s, cfg = prep.model, prep.splits, prep.cfg
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optimizer.lr, momentum=cfg.optimizer.momentum)
    gen = torch.Generator(device=prep.device).manual_seed(0)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(s.y_train), device=prep.device).split(cfg.batch_size):
            loss = F.cross_entropy(model(augment_images(s.x_train[idx], gen)), s.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            float((model(s.x_val).argmax(1) == s.y_val).float().mean())


def resnet_bench(
    images: int, epochs: int, device: str, root: Optional[str], repeats: int, threads: Optional[int] = None
) -> dict:
    """Images/s of training ResNet-20 on CIFAR-10 images: the trial engine (diagnostics on and
    off) against the bare loop, each timed from its config to the last epoch (data loaded, model
    built and initialized, the engine's diagnostics at init included), the sides in alternation
    (engine, bare, engine without diagnostics, then again) so that a shared machine's load falls
    on all three alike; medians over ``repeats`` rounds.

    The defaults (5,000 images x 8 epochs) give the engine's fixed costs the share they have in a
    real run rather than in a toy one. Beyond the bare loop's work the engine measures the network
    at initialization (a validation pass), tests it at the end (the test split), and with
    diagnostics probes it after epochs 0, 1, 2, 4, 8, ... and the last: each probe a forward and
    backward pass on 256 samples, as costly as two training steps. At 5,000 x 8 the probes are
    1,280 samples against 40,000 trained (3.2%); at 2,000 x 3 they would be 1,024 against 6,000
    (17%), and the ratio would measure the probe schedule, not the engine. A full CIFAR-10 run
    (45,000 images, 30 epochs, 7 probes) spends 0.13% on them.
    """
    import torch

    sys.path.insert(0, str(ROOT))
    from pipeline.config import config_from_dict
    from pipeline.engine.train import prepare_trial, probe_due, train_trial

    with tempfile.TemporaryDirectory() as tmp:
        root = _cifar_files(Path(tmp), images, root)
        configs = {d: _resnet_config(root, images, epochs, device, d, threads) for d in (True, False)}
        sides = {
            "engine": lambda: train_trial(prepare_trial(configs[True])),
            "bare": lambda: _bare_resnet_loop(prepare_trial(configs[False]), epochs),
            "engine_no_diagnostics": lambda: train_trial(prepare_trial(configs[False])),
        }
        _bare_resnet_loop(prepare_trial(configs[False]), 1)  # warm-up: kernels, allocator, the data cache
        load_before = os.getloadavg()[0]
        times, cpu = _alternated(sides, repeats, torch.cuda.synchronize if device.startswith("cuda") else None)
    train_cfg = config_from_dict(configs[True]).train
    probes = sum(probe_due(train_cfg, epoch) for epoch in range(epochs + 1))
    out: dict = {name: images * epochs / statistics.median(t) for name, t in times.items()}
    out["ratio"] = out["engine"] / out["bare"]
    out["ratio_no_diagnostics"] = out["engine_no_diagnostics"] / out["bare"]
    cpu_median = {name: statistics.median(t) for name, t in cpu.items()}
    out["cpu_ratio"] = cpu_median["bare"] / cpu_median["engine"]
    out["cpu_ratio_no_diagnostics"] = cpu_median["bare"] / cpu_median["engine_no_diagnostics"]
    out.update(
        images=images, epochs=epochs, device=device, threads=threads or torch.get_num_threads(), repeats=repeats,
        seconds=times, cpu_seconds=cpu, probes=probes, probe_share=probes * train_cfg.probe_size / (images * epochs),
        load_average=(load_before, os.getloadavg()[0]),
    )  # fmt: skip
    _print_resnet(out)
    return out


def _print_resnet(out: dict) -> None:
    print(
        f"ResNet-20, CIFAR-10 {out['images']} images x {out['epochs']} epochs on {out['device']} "
        f"({out['threads']} threads, median of {out['repeats']}, load average "
        f"{out['load_average'][0]:.1f} -> {out['load_average'][1]:.1f}): bare loop {out['bare']:.0f} images/s, "
        f"engine {out['engine']:.0f} images/s with diagnostics (ratio {out['ratio']:.2f}, in CPU time "
        f"{out['cpu_ratio']:.2f}; {out['probes']} probes, {100 * out['probe_share']:.1f}% of the trained samples), "
        f"{out['engine_no_diagnostics']:.0f} without ({out['ratio_no_diagnostics']:.2f}, in CPU time "
        f"{out['cpu_ratio_no_diagnostics']:.2f})"
    )


def _alternated(sides: dict, repeats: int, sync=None) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds of each side's run, ``repeats`` rounds of every side in turn; ``sync``
    (a device's synchronize, or None) before each clock reading. On a shared machine the CPU
    seconds (this process's, all its threads) are the steadier: waiting for a core is not in them."""
    wall: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            if sync:
                sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            if sync:
                sync()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


# ---------------------------------------------------------------- batching conv nets: does it pay?
def conv_batching(members: int, repeats: int) -> dict:
    """One training step's forward+backward of ``members`` same-shaped conv nets, one after another
    against all at once (``torch.func.vmap`` over stacked weights, as the MLP batching stacks
    them), one thread. Measures whether batching CNN and ResNet trials could pay on this device."""
    import copy

    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad, stack_module_state, vmap

    sys.path.insert(0, str(ROOT))
    from pipeline.config import ActivationConfig, ModelConfig, NormalizationConfig
    from pipeline.engine.nn.models import build_model

    torch.set_num_threads(1)
    out = {}
    for kind, depth, shape in (("cnn", 4, (1, 8, 8)), ("cnn", 4, (3, 32, 32)), ("resnet", 20, (1, 8, 8))):
        models = [
            build_model(ModelConfig(name=kind, depth=depth), ActivationConfig(), NormalizationConfig(), shape, 10)
            for _ in range(members)
        ]
        x, y = torch.randn(128, *shape), torch.randint(0, 10, (128,))
        params, buffers = stack_module_state(models)
        skeleton = copy.deepcopy(models[0]).to("meta")
        step = vmap(grad(lambda p, b: F.cross_entropy(functional_call(skeleton, (p, b), (x,)), y)))
        one_by_one = lambda: [F.cross_entropy(m(x), y).backward() for m in models]  # noqa: E731
        sides = {"one_by_one": one_by_one, "vmap": lambda: step(params, buffers)}
        for fn in sides.values():
            fn()  # warm-up
        times = {name: statistics.median(_time(fn) for _ in range(repeats)) for name, fn in sides.items()}
        label = f"{kind}{depth} {'x'.join(map(str, shape))}"
        out[label] = times
        print(
            f"conv batching, {members} members, {label}: one by one {times['one_by_one']:.3f} s a step, "
            f"vmapped {times['vmap']:.3f} s ({times['one_by_one'] / times['vmap']:.2f}x)"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--grid-bare", dest="grid_bare", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--procs", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--workloads",
        default="16,64",
        type=_counts(1),
        help="random-axes workloads to measure (trial counts), e.g. 16,64; '' for none",
    )
    ap.add_argument(
        "--grid",
        default="64",
        type=_counts(len(GRID_INITS)),
        help="initializer x scale grid workloads (trial counts, multiples of 4); '' for none",
    )
    ap.add_argument("--no-engine", dest="engine", action="store_false", help="skip the in-process engine comparison")
    ap.add_argument(
        "--no-overhead", dest="overhead", action="store_false", help="skip the 1-epoch overhead measurement"
    )
    ap.add_argument("--no-diagnostics", dest="diagnostics", action="store_false", help="skip the diagnostics cost")
    ap.add_argument("--memory-trials", type=int, default=0)
    ap.add_argument("--resnet", action="store_true", help="only the ResNet-20 / CIFAR-10 engine-vs-bare-loop figures")
    ap.add_argument("--resnet-images", type=int, default=5000, help="training images for --resnet")
    ap.add_argument("--resnet-epochs", type=int, default=8, help="epochs for --resnet")
    ap.add_argument("--threads", type=int, help="--resnet's torch threads (default: one per core)")
    ap.add_argument("--device", default="cpu", help="--resnet's device: cpu | cuda")
    ap.add_argument("--conv-batching", type=int, default=0, help="only: conv nets batched by vmap, N members")
    ap.add_argument("--cifar-root", help="--resnet reads the real CIFAR-10 here (default: random pixels)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    if args.bare:
        return bare_main(args.trials, args.epochs, args.procs, args.grid_bare)
    report = {"machine": f"{os.cpu_count()} CPUs", "workloads": []}
    if args.conv_batching:
        report["conv_batching"] = conv_batching(args.conv_batching, args.repeats)
    if args.resnet:
        report["resnet"] = resnet_bench(
            args.resnet_images, args.resnet_epochs, args.device, args.cifar_root, args.repeats, args.threads
        )
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
        return
    for n in args.workloads:
        report["workloads"].append(throughput(n, args.epochs, args.procs, args.repeats))
        _print_workload(report["workloads"][-1])
    for n in args.grid:
        report["workloads"].append(throughput(n, args.epochs, args.procs, args.repeats, grid=True))
        _print_workload(report["workloads"][-1])
    if args.engine:
        report["engine"] = engine(64, args.epochs, args.repeats)
    if args.overhead:
        report["overhead"] = overhead(args.procs, args.repeats)
    if args.diagnostics:
        report["diagnostics"] = diagnostics_cost(args.repeats)
        for schedule, d in report["diagnostics"].items():
            print(
                f"diagnostics, probe schedule {schedule}: {100 * d['share']:.1f}% of trial time "
                f"({d['with_s']:.3f} s with, {d['without_s']:.3f} s without)"
            )
    if args.memory_trials:
        report["memory"] = m = driver_memory(args.memory_trials)
        print(
            f"driver memory over {m['trials']} tiny trials: {m['rss_after_startup_mb']:.0f} MB after start-up, "
            f"max {m['rss_max_mb']:.0f} MB, growth {m['growth_mb']:.0f} MB; {m['child_runs']} child runs "
            f"({m['running_left']} RUNNING), {m['wall_s']:.0f} s"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def _print_workload(w: dict) -> None:
    print(
        f"{w['workload']} ({w['trials']} trials x {w['epochs']} epochs): bare loop {w['bare_s']:.1f} s ({w['bare_tpm']:.0f} trials/min)"
    )
    for side in ("batched", "unbatched"):
        p = w[side]
        print(
            f"  pipeline, trial batching {'on ' if side == 'batched' else 'off'}: {p['wall_s']:.1f} s ({p['tpm']:.0f} trials/min), "
            f"ratio {p['ratio']:.2f}; command to first trial {p['to_first_trial_s']:.1f} s; "
            f"{p['phase_tpm']:.0f} trials/min once trials run"
        )


if __name__ == "__main__":
    main()
