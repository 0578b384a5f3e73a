"""Scale benchmark: what a study of 10^3 to 10^5 trials costs its driver (issue 23).

Four modes, each printing its figures (``--json FILE`` also writes them):

    python scripts/bench_scale.py --optuna                      # ask + tell per trial, 1k/10k/100k
    python scripts/bench_scale.py --optuna --counts 1000,10000 --samplers random,tpe
    python scripts/bench_scale.py --pipeline 500                # the whole `pipeline run`, local Ray
    python scripts/bench_scale.py --pipeline 2000 --repeat 5    # five times: the median and range of trials/s
    python scripts/bench_scale.py --cluster 500                 # the same on scripts/ray_cluster.sh's nodes
    python scripts/bench_scale.py --pipeline 2000 --postgres    # recorded on scripts/postgres.sh's server
    python scripts/bench_scale.py --pipeline 2000 --postgres mlflow   # MLflow there, Optuna's journal file
    python scripts/bench_scale.py --writers 3000 [--postgres]   # the MLflow writers alone, 0/1/2 processes

``--optuna``: Optuna alone, in this process, as the study's loop uses it (pipeline/study/loop.py):
the sampler built by pipeline/study/plan.py's SAMPLERS, ``study.ask()``, the space's suggests, the
outcome's user attributes and ``study.tell``, on the project's journal file storage
(pipeline/study/storage.py) and in memory. Per trial it times the process's CPU (the machine is
shared: wall time would measure the neighbours) and prints the median over the last ``--window``
trials before each count. A run stops at ``--budget-s`` CPU-seconds (``--tpe-budget-s`` for TPE,
whose cost per trial grows); counts it did not reach are extrapolated from a straight line fitted
to its per-trial cost against the trial number, and marked as such. It also times the progress
bar's per-trial re-read of the study (pipeline/study/progress.py) and, in a fresh process, opening
the journal as a resume does.

``--pipeline N``: ``python -m pipeline run`` with N tiny trials (synthetic data, one hidden layer
of 8, 3 epochs, random sampler, trial batching on, full recording) on a local Ray. From the child
runs' start and end times in the MLflow store: the steady-state trials/s (the middle 80% of the
trials' ends); from /proc: the driver's CPU (utime + stime) per trial over that window and over
the whole command, and its peak RSS and growth; and an integrity check (every Optuna trial a
FINISHED child run with a val_accuracy history of one point per epoch, Optuna's trial count equal
to MLflow's child-run count, no run RUNNING).

``--cluster N``: the same with the trials on a cluster of scripts/ray_cluster.sh (a head node and
one worker node on this machine, each its own raylet: the script starts two nodes, no more),
started on ports of its own and stopped afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
SAMPLERS = ("random", "qmc", "grid", "tpe")
GROWING = ("tpe", "grid_stock")  # cost per trial grows with the trials: run under --tpe-budget-s
STORAGES = ("journal", "memory")
#: A grid of 108,000 points, so the grid sampler reaches 100k trials without re-visiting: the five
#: axes (scale as 40 values) x depth 1..10 x three widths.
GRID_SCALES = [round(2 ** (-2 + 4 * i / 39), 4) for i in range(40)]
GRID_SPACE = [
    f"space.scale=choice({', '.join(map(str, GRID_SCALES))})",
    "space.model.depth=range(1, 11)",
    "space.model.width=choice(8, 16, 32)",
]
TINY_TRIAL = ["dataset=synthetic", "model.depth=1", "model.width=8"]
TINY_EPOCHS = 3


# ---------------------------------------------------------------- Optuna: ask + tell per trial
def sampler_plan(sampler: str, folder: Path):
    """The study plan `pipeline run` would make (its sampler and axes): the default five-axis
    space, or GRID_SPACE for the grid sampler, which needs discrete axes. ``grid_stock``: the
    grid with Optuna's own GridSampler, whose ``after_trial`` the project overrides."""
    sys.path.insert(0, str(ROOT))
    warnings.filterwarnings("ignore", message="QMCSampler is experimental")
    import optuna

    from pipeline.study import space
    from pipeline.study.plan import plan_study

    grid = sampler.startswith("grid")
    name = "grid" if grid else sampler
    overrides = [f"study.sampler={name}", f"study.name=scale-{sampler}", f"study.output_dir={folder}"]
    plan = plan_study([*overrides, "study.n_trials=1000000", *(GRID_SPACE if grid else [])])
    if sampler == "grid_stock":
        plan.sampler = optuna.samplers.GridSampler(space.grid(plan.axes), seed=plan.cfg.study.seed)
    return plan


def open_study(plan, storage: str, folder: Path):
    """The Optuna study as the loop opens it, on a fresh journal file or in memory."""
    import optuna

    from pipeline.study import objectives
    from pipeline.study.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = open_storage(str(folder / "optuna.journal")) if storage == "journal" else None
    return optuna.create_study(
        storage=spec,
        study_name=plan.cfg.study.name,
        sampler=plan.sampler,
        pruner=plan.pruner,
        directions=[objectives.direction(n) for n in plan.cfg.study.objectives],
    )


def one_trial(study, plan) -> None:
    """What the loop does with Optuna per trial (``_ask``, then ``_tell`` with one seed's result)."""
    from pipeline.study import objectives, space
    from pipeline.study.optuna_journal import ask_new, held_appends, set_user_attrs

    trial = ask_new(study)
    with held_appends(study):
        params = space.suggest(trial, plan.axes)
    result = {"run_id": f"{trial.number:032x}", "pruned": False, "diverged": False, "epochs": 3}
    result["summary"] = {"final_val_accuracy": synthetic_accuracy(params, trial.number)}
    state, values, attrs = objectives.outcome({0: result}, {}, plan.seeds(), plan.cfg.study.objectives)
    set_user_attrs(trial, attrs)
    study.tell(trial, values=values, state=state)


def synthetic_accuracy(params: dict, number: int) -> float:
    """An objective with structure for TPE to find (best near scale 1), plus a little noise."""
    scale = float(params.get("scale", 1.0))
    noise = ((number * 2654435761) % 1000) / 1e4
    return max(0.0, 0.95 - 0.2 * abs(math.log2(scale)) - noise)


def ask_tell_run(sampler: str, storage: str, counts: list[int], args, folder: Path) -> dict:
    """Per-trial CPU times of ``max(counts)`` trials (or as many as the CPU budget allows)."""
    plan = sampler_plan(sampler, folder)
    study = open_study(plan, storage, folder)
    budget = args.tpe_budget_s if sampler in GROWING else args.budget_s
    target, marks = max(counts), set(counts)
    cpu_ns: list[int] = []
    snapshots, progress = {}, {}
    started = time.process_time()
    while len(cpu_ns) < target and (budget <= 0 or time.process_time() - started < budget):
        before = time.process_time_ns()
        one_trial(study, plan)
        cpu_ns.append(time.process_time_ns() - before)
        n = len(cpu_ns)
        if n in marks:
            progress[n] = progress_bar_ms(study)
            if storage == "journal" and n >= args.load_from:
                snapshots[n] = str(folder / f"at{n}.journal")
                shutil.copyfile(folder / "optuna.journal", snapshots[n])
    return {
        "sampler": sampler,
        "storage": storage,
        "axes": [a.key for a in plan.axes if a.distribution is not None],
        "trials_run": len(cpu_ns),
        "cpu_s": sum(cpu_ns) / 1e9,
        "curve": curve(cpu_ns, args.window),
        "cpu_ns": cpu_ns,
        "progress_bar_ms": progress,
        "snapshots": snapshots,
    }


def curve(cpu_ns: list[int], window: int) -> list[tuple[int, float]]:
    """(trials so far, median ms per trial over the last ``window`` trials) every ``window`` trials."""
    return [
        (end, statistics.median(cpu_ns[end - window : end]) / 1e6) for end in range(window, len(cpu_ns) + 1, window)
    ]


def at_count(run: dict, cpu_ns: list[int], count: int, window: int) -> dict:
    """The median ms per trial over the ``window`` trials before ``count``, and the CPU-seconds of
    all ``count`` trials: measured if the run got there, else from the fitted line."""
    if len(cpu_ns) >= count:
        ms = statistics.median(cpu_ns[count - window : count]) / 1e6
        return {"ms": ms, "total_s": sum(cpu_ns[:count]) / 1e9, "measured": True}
    intercept, slope = run["fit"]
    return {
        "ms": intercept + slope * (count - window / 2),
        "total_s": total_s(intercept, slope, count),
        "measured": False,
    }


def fit_line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares ms = a + b * n over the curve's points (the first, start-up, left out)."""
    pts = points[1:] if len(points) > 2 else points
    if len(pts) < 2:
        return (pts[0][1] if pts else 0.0), 0.0
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - slope * mx, slope


def total_s(intercept: float, slope: float, trials: int) -> float:
    """Seconds for ``trials`` trials at a cost per trial of ``intercept + slope * n`` ms."""
    return (intercept * trials + slope * trials * trials / 2) / 1e3


def progress_bar_ms(study, calls: int = 20) -> float:
    """CPU ms of one Progress.update (the default progress bar, updated from each ended trial)."""
    from pipeline.study.progress import Progress

    last = study.trials[-1]
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        bar = Progress(study, 0, 10**9, enabled=True)
        times = []
        for _ in range(calls):
            before = time.process_time_ns()
            bar.update(last, running=2, queued=0, failed=0)
            times.append(time.process_time_ns() - before)
        bar.close()
    return statistics.median(times) / 1e6


def journal_load(path: str) -> dict:
    """Open a journal as a resumed study does, in a fresh process: CPU and wall seconds."""
    out = subprocess.run(
        [sys.executable, __file__, "--load-journal", path], cwd=ROOT, check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_journal_here(path: str) -> None:
    """The timed part of ``journal_load``: open the study, read its trials, make one ask (a resume)."""
    import optuna

    sys.path.insert(0, str(ROOT))
    from pipeline.study.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cpu, wall = time.process_time(), time.perf_counter()
    storage = open_storage(path)
    (name,) = optuna.get_all_study_names(storage)
    study = optuna.load_study(study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler())
    trials = len(study.get_trials(deepcopy=False))
    study.ask()  # a resume's first dispatch waits for this
    figures = {
        "trials": trials,
        "cpu_s": time.process_time() - cpu,
        "wall_s": time.perf_counter() - wall,
        "max_rss_mb": peak_rss_mb(),
        "bytes": os.path.getsize(path),
    }
    print(json.dumps(figures))


def peak_rss_mb() -> float:
    """This process's peak RSS since its exec (VmHWM; getrusage's ru_maxrss would count the
    forked parent's too)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def optuna_mode(args) -> dict:
    out = {"counts": args.counts, "window": args.window, "runs": [], "journal_load": {}}
    for sampler in args.samplers:
        for storage in args.storages:
            with tempfile.TemporaryDirectory() as tmp:
                run = ask_tell_run(sampler, storage, args.counts, args, Path(tmp))
                gc.collect()
                run["fit"] = fit_line(run["curve"])
                cpu_ns = run.pop("cpu_ns")
                run["at"] = {n: at_count(run, cpu_ns, n, args.window) for n in args.counts}
                if sampler == args.load_sampler:
                    out["journal_load"].update({n: journal_load(p) for n, p in run.pop("snapshots").items()})
                run.pop("snapshots", None)
            out["runs"].append(run)
            print_run(run, args.counts)
    for _, load in sorted(out["journal_load"].items()):
        print(
            f"opening a journal of {load['trials']} trials ({load['bytes'] / 1e6:.0f} MB) and asking once: "
            f"{load['cpu_s']:.1f} CPU-s ({load['wall_s']:.1f} s wall), peak RSS {load['max_rss_mb']:.0f} MB"
        )
    return out


def print_run(run: dict, counts: list[int]) -> None:
    cells = []
    for n in counts:
        at = run["at"][n]
        guess = "" if at["measured"] else ", extrapolated"
        cells.append(f"{n}: {at['ms']:.2f} ms/trial ({duration(at['total_s'])} CPU for all{guess})")
    stopped = f"; stopped at {run['trials_run']} trials" if run["trials_run"] < max(counts) else ""
    bars = ", ".join(f"{n}: {ms:.2f} ms" for n, ms in run["progress_bar_ms"].items())
    print(
        f"ask+tell {run['sampler']:>6} on {run['storage']:>7} ({len(run['axes'])} axes): {'; '.join(cells)}; "
        f"{run['fit'][1] * 1e4:+.2f} ms/trial per 10k trials{stopped}; progress bar's re-read {bars}"
    )


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------- the whole pipeline
def tiny_study_cmd(folder: Path, name: str, trials: int, extra: list[str]) -> list[str]:
    """bench.py's study command (random sampler, progress bar and report off) with tiny trials."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench import pipeline_cmd

    return pipeline_cmd(folder, name, trials, TINY_EPOCHS, [*TINY_TRIAL, *extra])


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def proc_cpu_s(pid: int) -> Optional[float]:
    """The process's own utime + stime (not its children's), from /proc/<pid>/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> Optional[float]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def writer_pids(driver: int) -> list[int]:
    """The driver's MLflow writer processes (pipeline/record/writers.py)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if parent == driver and b"pipeline.record.writers" in (stat.parent / "cmdline").read_bytes():
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def watch_driver(
    cmd: list[str], env: dict, log: Path, py_spy: Optional[str] = None, every_s: float = 0.25
) -> tuple[list[tuple[float, float, float]], list[tuple[float, float, float]]]:
    """Run the study command; sample its (epoch ms, CPU s, RSS MB) and its writers' (epoch ms,
    CPU s, 0) until it exits. With ``py_spy`` (py-spy's path), also profile it into
    ``<log>.pyspy`` (raw stacks; without pausing it)."""
    samples, writer_samples, writers = [], [], []
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
        if py_spy:
            profile = [py_spy, "record", "-p", str(proc.pid), "-f", "raw", "-o", f"{log}.pyspy", "--nonblocking"]
            subprocess.Popen(profile, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None:
            cpu, rss = proc_cpu_s(proc.pid), proc_rss_mb(proc.pid)
            writers = writers or writer_pids(proc.pid)
            if cpu is not None and rss is not None:
                samples.append((time.time() * 1000, cpu, rss))
                writer_samples.append((samples[-1][0], sum(proc_cpu_s(w) or 0.0 for w in writers), 0.0))
            time.sleep(every_s)
    if proc.returncode:
        raise SystemExit(f"the study failed (rc {proc.returncode}); its output: {log}\n{log.read_text()[-3000:]}")
    return samples, writer_samples


def child_runs(store_url: str, name: str) -> list[dict]:
    """Every trial run of the study: id, status, start/end, val_accuracy points, Optuna trial number."""
    import sqlalchemy

    query = sqlalchemy.text(
        """SELECT r.run_uuid, r.status, r.start_time, r.end_time,
                  (SELECT COUNT(DISTINCT m.step) FROM metrics m WHERE m.run_uuid = r.run_uuid AND m.key = 'val_accuracy'),
                  (SELECT t.value FROM tags t WHERE t.run_uuid = r.run_uuid AND t.key = 'optuna_trial')
           FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id
           WHERE e.name = :name AND EXISTS (SELECT 1 FROM tags t WHERE t.run_uuid = r.run_uuid
                 AND t.key = 'initstudy.role' AND t.value = 'trial')"""
    )
    engine = sqlalchemy.create_engine(store_url)
    with engine.connect() as connection:
        rows = connection.execute(query, {"name": name}).fetchall()
    engine.dispose()
    keys = ("run_id", "status", "start_ms", "end_ms", "val_points", "trial")
    return [dict(zip(keys, row)) for row in rows]


def optuna_trials(storage: str, name: str) -> dict:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sys.path.insert(0, str(ROOT))
    from pipeline.study.storage import open_storage

    study = optuna.load_study(study_name=name, storage=open_storage(storage))
    states: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        states[t.state.name] = states.get(t.state.name, 0) + 1
    return states


def stores(folder: Path, name: str, postgres: Optional[str]) -> dict[str, str]:
    """Where the study records: its MLflow store and its Optuna storage (a journal file; with
    ``--postgres`` scripts/postgres.sh's databases, the server started if it is not running)."""
    journal = str(folder / "studies" / name / "optuna.journal")
    if not postgres:
        return {"tracking": f"sqlite:///{folder}/mlflow.db", "optuna": journal}
    script = str(ROOT / "scripts" / "postgres.sh")
    subprocess.run(["bash", script, "start"], check=True, capture_output=True)
    tracking, optuna_url = subprocess.run(
        ["bash", script, "url"], check=True, capture_output=True, text=True
    ).stdout.split()
    return {"tracking": tracking, "optuna": optuna_url if postgres == "all" else journal}


def integrity(runs: list[dict], trials: dict, n: int) -> dict:
    """Every trial recorded once, finished, with a full curve; Optuna and MLflow agree."""
    counted = sum(trials.values())
    numbers = {r["trial"] for r in runs}
    ok = {
        "child_runs": len(runs),
        "optuna_trials": counted,
        "optuna_states": trials,
        "running": sum(r["status"] == "RUNNING" for r in runs),
        "not_finished": sum(r["status"] != "FINISHED" for r in runs),
        "short_curves": sum(r["val_points"] < TINY_EPOCHS for r in runs),
        "distinct_trials": len(numbers),
    }
    ok["ok"] = (
        len(runs) == counted == n == len(numbers)
        and ok["running"] == ok["not_finished"] == ok["short_curves"] == 0
        and trials.get("COMPLETE", 0) == n
    )
    return ok


def steady_state(runs: list[dict], samples: list[tuple[float, float, float]], writer_samples: list) -> dict:
    """Trials/s, and the driver's and its writers' CPU per trial, between the 10% and the 90%
    quantile of the trials' ends."""
    ends = sorted(r["end_ms"] for r in runs)
    lo, hi = ends[len(ends) // 10], ends[(len(ends) * 9) // 10]
    trials = sum(lo < e <= hi for e in ends)
    cpu = interpolate(samples, hi) - interpolate(samples, lo)
    writers = interpolate(writer_samples, hi) - interpolate(writer_samples, lo)
    return {
        "trials_per_s": trials / ((hi - lo) / 1000),
        "driver_cpu_ms_per_trial": 1000 * cpu / trials,
        "writer_cpu_ms_per_trial": 1000 * writers / trials,
    }


def interpolate(samples: list[tuple[float, float, float]], at_ms: float) -> float:
    """The driver's CPU seconds at ``at_ms``, linear between the two samples around it."""
    for (t0, c0, _), (t1, c1, _) in itertools.pairwise(samples):
        if t0 <= at_ms <= t1:
            return c0 + (c1 - c0) * (at_ms - t0) / (t1 - t0) if t1 > t0 else c0
    return samples[-1][1] if at_ms > samples[-1][0] else samples[0][1]


def memory(samples: list[tuple[float, float, float]], runs: list[dict]) -> dict:
    """Peak RSS, and its growth from the first trial's end to the last one's."""
    first, last = min(r["end_ms"] for r in runs), max(r["end_ms"] for r in runs)
    during = [rss for t, _, rss in samples if first <= t <= last] or [samples[-1][2]]
    return {
        "rss_at_first_trial_mb": during[0],
        "rss_max_mb": max(s[2] for s in samples),
        "growth_mb": max(during) - during[0],
    }


def study_run(trials: int, extra: list[str], env: dict, folder: Path, label: str, args) -> dict:
    """One tiny study through `python -m pipeline run`, measured (see the module's docstring);
    with ``args.attribute``, through ``driver_main``, which adds up where its CPU goes."""
    name = f"scale{trials}-{folder.name}" if args.postgres else f"scale{trials}"  # a server keeps earlier studies
    where = stores(folder, name, args.postgres)
    cmd = [c for c in tiny_study_cmd(folder, name, trials, extra) if not c.startswith("tracking.uri=")]
    stores_used = [
        f"tracking.uri={where['tracking']}",
        *([f"study.storage={where['optuna']}"] if args.postgres == "all" else []),
    ]
    cmd += stores_used
    if args.attribute:
        cmd = [sys.executable, __file__, "--driver", *cmd[4:]]  # cmd[:4]: python -m pipeline run
        env = {**env, "BENCH_SCALE_LEDGER": str(folder / "ledger.json")}
    started, before = time.perf_counter(), children_cpu_s()
    samples, writer_samples = watch_driver(cmd, env, folder / "driver.log", args.py_spy)
    wall, all_cpu = time.perf_counter() - started, children_cpu_s() - before
    runs = child_runs(where["tracking"], name)
    check = integrity(runs, optuna_trials(where["optuna"], name), trials)
    out = {
        "mode": f"{label}, postgres ({args.postgres})" if args.postgres else label,
        "name": name,
        "stores": stores_used,
        "trials": trials,
        "wall_s": wall,
        "driver_cpu_s": samples[-1][1],
        "driver_cpu_ms_per_trial_whole": 1000 * samples[-1][1] / trials,
        # The driver and what it started and reaped (Ray's daemons and workers): the whole study's CPU.
        "all_processes_cpu_ms_per_trial": 1000 * all_cpu / trials,
        **steady_state(runs, samples, writer_samples),
        **memory(samples, runs),
        "integrity": check,
        "folder": str(folder),
    }
    print_study(out)
    if args.attribute:
        out["attribution"] = attribution(folder / "ledger.json", trials)
    return out


def print_study(s: dict) -> None:
    c = s["integrity"]
    print(
        f"{s['mode']} study of {s['trials']} tiny trials: {s['wall_s']:.0f} s; steady state {s['trials_per_s']:.1f} trials/s, "
        f"driver {s['driver_cpu_ms_per_trial']:.1f} CPU-ms per trial ({s['driver_cpu_ms_per_trial_whole']:.1f} over the "
        f"whole command, {s['driver_cpu_s']:.0f} CPU-s), writers {s['writer_cpu_ms_per_trial']:.1f} CPU-ms per trial "
        f"(the study's processes together "
        f"{s['all_processes_cpu_ms_per_trial']:.0f} CPU-ms per trial); driver RSS {s['rss_at_first_trial_mb']:.0f} MB at the first trial, "
        f"max {s['rss_max_mb']:.0f} MB, growth {s['growth_mb']:.0f} MB; integrity {'ok' if c['ok'] else 'FAILED'} "
        f"({c['child_runs']} child runs, {c['optuna_trials']} Optuna trials {c['optuna_states']}, {c['running']} RUNNING, "
        f"{c['short_curves']} with fewer than {TINY_EPOCHS} val_accuracy points)"
    )


def report_time(folder: Path, name: str, stores_used: list[str]) -> dict:
    """`python -m pipeline report` of the study just run: wall and CPU seconds (its own and children's)."""
    cmd = [
        sys.executable, "-m", "pipeline", "report", name, f"study.output_dir={folder}/studies",
        f"tracking.artifact_root={folder}/artifacts", *stores_used,
    ]  # fmt: skip
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    out = {"wall_s": time.perf_counter() - started, "cpu_s": cpu, "rc": done.returncode}
    print(f"report of {name}: {out['wall_s']:.1f} s wall, {cpu:.1f} CPU-s (rc {done.returncode})")
    if done.returncode:
        print(done.stderr[-2000:], file=sys.stderr)
    return out


# ---------------------------------------------------------------- the writers alone
def writers_mode(runs: int, args) -> dict:
    """How fast ``study.writers`` processes record: ``runs`` copies of one real tiny trial's
    journal (one flush, open to end, as a short trial sends it) sent through
    pipeline/record/writers.py's ``Writers`` with 0 (the driver itself), 1, 2... processes,
    timed from the first send to the last run's "ended" answer. No Ray, no Optuna, no training:
    the recording's own capacity, which a study's trials/s cannot exceed."""
    sys.path.insert(0, str(ROOT))
    results = {}
    for processes in args.writer_counts:
        folder = Path(tempfile.mkdtemp(prefix="bench_writers_"))
        where = stores(folder, f"writers-{folder.name}", args.postgres)
        tracking_cfg, config = writer_config(folder, where["tracking"])
        results[processes] = time_writers(tracking_cfg, one_trial_flush(config, folder.name), runs, processes)
        print(
            f"writers={processes}: {runs} runs in {results[processes]['wall_s']:.1f} s, "
            f"{results[processes]['runs_per_s']:.0f} runs/s, {results[processes]['writer_cpu_ms_per_run']:.1f} "
            f"CPU-ms a run in the writers ({'postgres' if args.postgres else 'sqlite'})"
        )
        shutil.rmtree(folder, ignore_errors=True)
    return results


def writer_config(folder: Path, uri: str):
    """A tiny trial's config recording to ``uri``, and its tracking section, the store made."""
    from pipeline.config import config_from_dict
    from pipeline.config.composition import compose
    from pipeline.record.store import open_store

    config = compose(
        [*TINY_TRIAL, f"train.epochs={TINY_EPOCHS}", f"tracking.uri={uri}", f"tracking.artifact_root={folder}/a"]
    )
    open_store(uri)
    return config_from_dict(config).tracking, config


def one_trial_flush(config: dict, experiment: str) -> list:
    """A real tiny trial trained into a journal: its one flush's operations."""
    from pipeline.record import journal
    from pipeline.record.runner import TrialRequest, run_recorded_batch

    flushes: list = []
    journal.FLUSH_EVERY_S = 600.0  # one flush, however long this first trial's imports take
    run_recorded_batch(
        [TrialRequest(config, experiment, run_name="trial-0-seed-0")],
        journal.journal_starter(lambda k, ops: flushes.append(ops)),
    )
    assert len(flushes) == 1, "a tiny trial's record travels in one flush"
    return flushes[0]


def time_writers(tracking_cfg, ops: list, runs: int, processes: int) -> dict:
    from pipeline.record.writers import Writers

    writers = Writers(tracking_cfg, processes)
    keys = [f"bench-{i}" for i in range(runs)]
    writers.sync()  # the processes started and MLflow imported: not part of their rate
    pids = [c.process.pid for c in writers.channels if hasattr(c, "process")]
    cpu_before = sum(proc_cpu_s(pid) or 0.0 for pid in pids) if pids else time.process_time()
    started = time.perf_counter()
    for key in keys:
        writers.write(key, ops)
        writers.poll()
    while len(writers.ended) < runs:
        writers.poll(1.0)
    wall = time.perf_counter() - started
    cpu = (sum(proc_cpu_s(pid) or 0.0 for pid in pids) if pids else time.process_time()) - cpu_before
    writers.close()
    return {"wall_s": wall, "runs_per_s": runs / wall, "writer_cpu_ms_per_run": 1000 * cpu / runs}


# ---------------------------------------------------------------- where the driver's CPU goes
#: (label, module, attribute path): the driver's functions whose own CPU time (their callees'
#: timed separately) the ledger adds up; innermost wins, so the Optuna journal's writes are counted
#: apart from the ask or tell that made them.
LEDGER_POINTS = [
    ("mlflow: replay (the rest)", "pipeline.record.journal", "Replay.apply"),
    ("mlflow: replay (the rest)", "pipeline.record.journal", "Replay.end_open"),
    ("mlflow: create run", "pipeline.record.journal", "start_run"),
    ("mlflow: params, metrics, tags (one batch)", "pipeline.record.runs", "Run.flush"),
    ("mlflow: artifact files", "pipeline.record.runs", "Run.log_files"),
    ("mlflow: end run", "pipeline.record.runs", "Run.end"),
    ("mlflow writers: send, poll", "pipeline.record.writers", "Writers.write"),
    ("mlflow writers: send, poll", "pipeline.record.writers", "Writers.poll"),
    ("mlflow writers: send, poll", "pipeline.record.writers", "Writers.tag"),
    ("mlflow writers: send, poll", "pipeline.record.writers", "Writers.forget"),
    ("mlflow writers: send, poll", "pipeline.record.writers", "Writers.end_open"),
    ("optuna: ask + suggest", "optuna.study", "Study.ask"),
    ("optuna: ask + suggest", "pipeline.study.space", "suggest"),
    ("optuna: tell + user attrs", "optuna.study", "Study.tell"),
    ("optuna: tell + user attrs", "optuna.trial", "Trial.set_user_attr"),
    ("optuna journal: append (lock, write, fsync)", "optuna.storages.journal", "JournalFileBackend.append_logs"),
    ("optuna journal: read new records", "optuna.storages.journal", "JournalStorage._sync_with_backend"),
    ("trial config", "pipeline.study.plan", "StudyPlan.trial_config"),
    ("task payloads", "pipeline.study.study_run", "StudyRun.payload"),
    ("batch grouping", "pipeline.study.loop", "_task_groups"),
    ("progress bar", "pipeline.study.progress", "Progress.update"),
    ("ray: submit", "pipeline.study.cluster", "submit"),
    ("ray: wait", "pipeline.study.cluster", "wait"),
    ("ray: next item (get)", "pipeline.study.cluster", "next_item"),
    ("loop itself", "pipeline.study.loop", "_Loop.run"),
]


class Ledger:
    """Exclusive main-thread CPU time per label, and the whole process's CPU during the loop."""

    def __init__(self) -> None:
        import threading

        self.main = threading.main_thread().ident
        self.totals: dict[str, int] = {}
        self.stack: list[list] = []  # [label, thread CPU ns when it last resumed]
        self.loop_process_ns = 0

    def wrap(self, label: str, fn):
        import functools
        import threading

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if threading.get_ident() != self.main:
                return fn(*args, **kwargs)
            self._enter(label)
            try:
                return fn(*args, **kwargs)
            finally:
                self._leave()

        return timed

    def _enter(self, label: str) -> None:
        now = time.thread_time_ns()
        if self.stack:
            self._charge(self.stack[-1], now)
        self.stack.append([label, now])

    def _leave(self) -> None:
        now = time.thread_time_ns()
        self._charge(self.stack.pop(), now)
        if self.stack:
            self.stack[-1][1] = now

    def _charge(self, frame: list, now: int) -> None:
        self.totals[frame[0]] = self.totals.get(frame[0], 0) + now - frame[1]

    def install(self) -> None:
        import importlib

        for label, module, path in LEDGER_POINTS:
            owner = importlib.import_module(module)
            *parents, name = path.split(".")
            for parent in parents:
                owner = getattr(owner, parent)
            setattr(owner, name, self.wrap(label, getattr(owner, name)))
        import pipeline.study.loop as loop

        run = loop._Loop.run

        def whole_loop(loop_self):
            before = time.process_time_ns()
            try:
                return run(loop_self)
            finally:
                self.loop_process_ns += time.process_time_ns() - before

        loop._Loop.run = whole_loop


def driver_main(overrides: list[str]) -> int:
    """`python -m pipeline run` with the ledger installed; it is written to $BENCH_SCALE_LEDGER."""
    sys.path.insert(0, str(ROOT))
    ledger = Ledger()
    ledger.install()
    from pipeline.cli import main as cli_main

    try:
        return cli_main(["run", *overrides])
    finally:
        figures = {"totals_ns": ledger.totals, "loop_process_ns": ledger.loop_process_ns}
        Path(os.environ["BENCH_SCALE_LEDGER"]).write_text(json.dumps(figures))


def attribution(path: Path, trials: int) -> dict:
    """CPU ms per trial by label; what other threads (Ray's core worker, log readers) used during
    the loop; shares of the loop's process CPU."""
    figures = json.loads(path.read_text())
    per_trial = {label: ns / 1e6 / trials for label, ns in figures["totals_ns"].items()}
    loop_ms = figures["loop_process_ns"] / 1e6 / trials
    per_trial["other threads (Ray core worker, log readers)"] = loop_ms - sum(per_trial.values())
    ranked = dict(sorted(per_trial.items(), key=lambda kv: -kv[1]))
    print(f"the driver's loop: {loop_ms:.1f} CPU-ms per trial (all threads), of which:")
    for label, ms in ranked.items():
        print(f"  {ms:6.2f} ms  {100 * ms / loop_ms:4.1f}%  {label}")
    return {"loop_cpu_ms_per_trial": loop_ms, "ms_per_trial": ranked}


# ---------------------------------------------------------------- a multi-node cluster on this machine
@contextlib.contextmanager
def ray_cluster(folder: Path, head_port: int, dashboard_port: int):
    """scripts/ray_cluster.sh's head and worker nodes (one CPU each), on ports of our own; the
    client's environment while they run. Stopped (only its own processes) on the way out."""
    env = {
        **os.environ,
        "RAY_HEAD_PORT": str(head_port),
        "RAY_DASHBOARD_PORT": str(dashboard_port),
        "RAY_CLUSTER_DIR": str(folder / "ray-cluster"),
        "RAY_CLUSTER_TMP": f"/tmp/ray-scale-{head_port}",
    }
    script = str(ROOT / "scripts" / "ray_cluster.sh")
    subprocess.run([script, "start"], env=env, check=True)
    try:
        client = dict(env)
        for line in (folder / "ray-cluster" / "env.sh").read_text().splitlines():
            key, value = line.removeprefix("export ").split("=", 1)
            client[key] = value
        yield client
    finally:
        subprocess.run([script, "stop"], env=env, check=False)
        shutil.rmtree(env["RAY_CLUSTER_TMP"], ignore_errors=True)  # the nodes' session logs


def repeated_pipeline(trials: int, args, cluster: bool) -> dict:
    """``pipeline_mode`` ``--repeat`` times; with several, their median trials/s and range: runs
    of the same study differ by +-15% on a shared 2-CPU machine, so one run is no figure."""
    runs = [pipeline_mode(trials, args, cluster) for _ in range(args.repeat)]
    if len(runs) == 1:
        return runs[0]
    rates = sorted(run["trials_per_s"] for run in runs)
    middle = statistics.median(rates)
    print(f"{len(runs)} runs: median {middle:.1f} trials/s, range {rates[0]:.1f}-{rates[-1]:.1f}")
    return {"runs": runs, "median_trials_per_s": middle, "min_trials_per_s": rates[0], "max_trials_per_s": rates[-1]}


def pipeline_mode(trials: int, args, cluster: bool) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    extra = list(args.set)
    if cluster:
        with ray_cluster(folder, args.head_port, args.dashboard_port) as env:
            out = study_run(trials, [*extra, f"cluster.address={env['RAY_ADDRESS']}"], env, folder, "cluster", args)
    else:
        out = study_run(trials, extra, dict(os.environ), folder, "local", args)
    if args.report:
        out["report"] = report_time(folder, out["name"], out["stores"])
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return out


def _counts(text: str) -> list[int]:
    return sorted(_numbers(text, least=1, example="1000,10000"))


def _process_counts(text: str) -> list[int]:
    return _numbers(text, least=0, example="0,1,2")


def _numbers(text: str, least: int, example: str) -> list[int]:
    numbers = [int(part) if part.strip().isdigit() else -1 for part in text.split(",") if part.strip()]
    if not numbers or any(n < least for n in numbers):
        raise argparse.ArgumentTypeError(f"{text!r}: give whole numbers of {least} or more, e.g. {example}")
    return numbers


def _names(valid: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        bad = [n for n in names if n not in valid]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(valid)}")
        return names

    return parse


def main() -> None:
    if sys.argv[1:2] == ["--driver"]:  # the study's driver, with the ledger (--attribute)
        sys.exit(driver_main(sys.argv[2:]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--optuna", action="store_true", help="ask + tell per trial, per sampler and storage")
    ap.add_argument("--pipeline", type=int, default=0, metavar="N", help="a study of N tiny trials on a local Ray")
    ap.add_argument("--cluster", type=int, default=0, metavar="N", help="the same on a two-node Ray cluster")
    ap.add_argument("--repeat", type=int, default=1, metavar="K", help="--pipeline/--cluster K times: median and range")
    ap.add_argument("--writers", type=int, default=0, metavar="N", help="N runs through the writers alone")
    ap.add_argument("--writer-counts", type=_process_counts, default=[0, 1, 2], help="--writers' process counts")
    ap.add_argument("--counts", type=_counts, default=[1000, 10000, 100000], help="--optuna's trial counts")
    ap.add_argument(
        "--samplers",
        type=_names((*SAMPLERS, "grid_stock")),
        default=list(SAMPLERS),
        help="grid_stock: Optuna's GridSampler with its own after_trial (not the project's)",
    )
    ap.add_argument("--storages", type=_names(STORAGES), default=list(STORAGES))
    ap.add_argument("--window", type=int, default=500, help="trials per median (at most half the least count)")
    ap.add_argument("--budget-s", type=float, default=0, help="CPU-seconds per sampler run (0: no limit)")
    ap.add_argument("--tpe-budget-s", type=float, default=240, help="CPU-seconds for a tpe or grid_stock run")
    ap.add_argument("--load-from", type=int, default=10000, help="time opening the journal at counts from this on")
    ap.add_argument("--load-sampler", default="random", help="whose journals to time opening")
    ap.add_argument("--set", action="append", default=[], help="an extra override of the study (repeatable)")
    ap.add_argument(
        "--postgres",
        nargs="?",
        const="all",
        choices=("all", "mlflow"),
        help="record on scripts/postgres.sh's server: MLflow and Optuna (all), or MLflow only (Optuna's journal file)",
    )
    ap.add_argument("--report", action="store_true", help="also time `pipeline report` of the study")
    ap.add_argument("--keep", action="store_true", help="keep the study's folder (printed)")
    ap.add_argument("--head-port", type=int, default=6490, help="--cluster's GCS port (+1: the client server)")
    ap.add_argument("--dashboard-port", type=int, default=8366)
    ap.add_argument("--attribute", action="store_true", help="add up the driver's CPU by what it does")
    ap.add_argument("--py-spy", metavar="PATH", help="profile the study's driver with this py-spy (--keep keeps it)")
    ap.add_argument("--load-journal", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    if args.load_journal:
        return load_journal_here(args.load_journal)
    if args.repeat < 1:
        ap.error(f"--repeat {args.repeat}: give 1 or more")
    args.window = max(1, min(args.window, min(args.counts) // 2))
    report: dict = {"machine": f"{os.cpu_count()} CPUs"}
    if args.optuna:
        report["optuna"] = optuna_mode(args)
    if args.pipeline:
        report["pipeline"] = repeated_pipeline(args.pipeline, args, cluster=False)
    if args.cluster:
        report["cluster"] = repeated_pipeline(args.cluster, args, cluster=True)
    if args.writers:
        report["writers"] = writers_mode(args.writers, args)
    if len(report) == 1:
        ap.error("choose a mode: --optuna, --pipeline N, --cluster N or --writers N")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
