"""Trials/min on one device, the trial engine alone (no Ray, no MLflow): one trial at a time against
several trials sharing the device (processes, as fractional ``cluster.gpus_per_trial`` places them)
and trials trained together (trial batching), and both.

Workload: the bench's grid (scripts/bench.py): initializer (4) x scale, MLP 4x128 on digits, ReLU,
batch size 64, SGD, 10 epochs, diagnostics on, as a study's trials train. Every process warms up
(imports, CUDA context, a first trial) before the clock starts; the figure is trials over the wall
time of the slowest process.

    python scripts/gpu_bench.py                                   # cuda if there is one, else cpu
    python scripts/gpu_bench.py --procs 1,4,8 --batch 1,16,64 --json out.json
    python scripts/gpu_bench.py --set model.width=1024 --set batch_size=256   # a larger model

On a machine without Ray and MLflow (a GPU box with PyTorch), it needs only hydra-core, omegaconf
and scikit-learn (for the digits) beside PyTorch: docs/gpu.md says how to run it there.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench import _counts, grid_configs  # noqa: E402


def train_share(configs: list[dict], batch: int) -> None:
    """Train ``configs`` in tasks of ``batch`` members, as a worker would (one alone: the unbatched engine)."""
    from pipeline.engine.batched import train_batch
    from pipeline.engine.train import prepare_trial, train_trial

    for start in range(0, len(configs), batch):
        task = configs[start : start + batch]
        if len(task) == 1:
            train_trial(prepare_trial(task[0]))
        else:
            train_batch([prepare_trial(c) for c in task])
    _synchronize(configs[0]["train"]["device"])


def _synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _process(configs: list[dict], batch: int, ready, results) -> None:
    """One process sharing the device: warm up, wait for the others, then train its share, timed."""
    train_share(configs[: min(2, batch)], batch)  # imports, CUDA context, a first optimizer step
    ready.wait()
    start = time.perf_counter()
    train_share(configs, batch)
    results.put(time.perf_counter() - start)


def measure(configs: list[dict], procs: int, batch: int) -> dict:
    """Wall time of ``procs`` processes training ``configs`` between them in tasks of ``batch``."""
    ctx = mp.get_context("spawn")
    ready, results = ctx.Barrier(procs), ctx.Queue()
    shares = [configs[i::procs] for i in range(procs)]
    workers = [ctx.Process(target=_process, args=(share, batch, ready, results)) for share in shares if share]
    for worker in workers:
        worker.start()
    try:
        times = _times(results, workers)
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.terminate()
    wall = max(times)
    return {"procs": procs, "batch": batch, "trials": len(configs), "wall_s": wall, "tpm": 60 * len(configs) / wall}


def _grid_trials(text: str) -> int:
    counts = _counts(4)(text)
    if len(counts) != 1:
        raise argparse.ArgumentTypeError(f"{text!r}: one trial count, a positive multiple of 4")
    return counts[0]


def _times(results, workers: list) -> list[float]:
    """Each process's timed seconds; a process that died (an error, out of memory) fails the row
    at once instead of leaving the others waiting at the barrier."""
    times: list[float] = []
    while len(times) < len(workers):
        try:
            times.append(results.get(timeout=1.0))
        except queue.Empty:
            dead = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
            if dead:
                for worker in workers:
                    worker.terminate()
                raise RuntimeError(f"a benchmark process failed (exit code {dead[0]})") from None
    return times


def describe_device(device: str) -> str:
    import torch

    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else f"{os.cpu_count()} CPUs"
    return f"{name}, torch {torch.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    ap.add_argument("--trials", type=_grid_trials, default="64", help="grid trials (a multiple of 4)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--procs", type=_counts(1), default="1,4", help="processes sharing the device, e.g. 1,4,8")
    ap.add_argument("--batch", type=_counts(1), default="1,16", help="members per task (1: one trial at a time)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every trial (repeatable), e.g. model.width=1024",
    )
    ap.add_argument("--json", help="also write the figures to this file (after each row)")
    args = ap.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    configs = grid_configs(args.trials, args.epochs, f"train.device={device}", *args.set)
    print(
        f"device: {describe_device(device)}; {len(configs)} grid trials x {args.epochs} epochs"
        f"{''.join(' ' + o for o in args.set)}",
        flush=True,
    )
    rows = []
    for procs in args.procs:
        for batch in args.batch:
            try:
                rows.append(measure(configs, procs, batch))
            except RuntimeError as error:  # one mode failing (memory, say) leaves the other rows to measure
                print(f"  {procs} process(es) x tasks of {batch:>3}: failed: {error}", flush=True)
                continue
            base = rows[0]["tpm"]
            print(
                f"  {procs} process(es) x tasks of {batch:>3}: {rows[-1]['wall_s']:6.1f} s, "
                f"{rows[-1]['tpm']:7.0f} trials/min ({rows[-1]['tpm'] / base:.2f}x the first row)",
                flush=True,
            )
            if args.json:  # row by row, so that a run cut short still leaves its figures
                figures = {"device": describe_device(device), "overrides": args.set, "rows": rows}
                Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
