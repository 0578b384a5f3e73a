"""Report benchmark: `python -m pipeline report` of a study of 10^4-10^5 trials (issue 23), and the
MLflow UI's listing of its runs.

    python scripts/bench_report.py --trials 10000,100000        # build each study, time its report
    python scripts/bench_report.py --trials 10000 --ui          # also time the UI's runs listing
    python scripts/bench_report.py --trials 30 --template 2 --json out.json   # the test's small run

Training 10^5 trials takes hours, and the report does not care how its runs were trained, so each
study is grown from a real one. ``--template`` tiny trials run through the real ``python -m
pipeline run`` (bench_scale.py's tiny trial: synthetic data, one hidden layer of 8, 3 epochs,
random sampler, full recording) and write the record: the study's parent run, a child run per
trial with its tags, params, per-epoch metrics and artifacts, and the Optuna trials. Each further
trial is a copy of one template trial: its rows in every MLflow table that holds them (run, tags,
params, metric history, latest metrics) with the run id, name, trial number, batch, times and
axes replaced and the accuracy curves rescaled to a synthetic final accuracy; its Optuna trial
(same distributions and user attributes, new params and value, appended to the journal as Optuna
itself writes it); its artifact folder (hard links to the template's files). Nothing of the format
is written by hand, so it cannot drift from what `pipeline run` writes.

Per study it prints the report's wall time, its CPU (the report process and its importances
helper), its peak RSS (the report process's VmHWM) and the machine's load average. With ``--ui``
it starts ``mlflow server`` on 127.0.0.1 over the store and times the runs-search calls the UI's
experiment page makes (as captured from the UI in headless Chromium: ``max_results`` 100, then
200, newest first), and a page halfway down the list (the UI's "Load more" sends the page token).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
TINY_TRIAL = ["dataset=synthetic", "model.depth=1", "model.width=8"]  # bench_scale.py's tiny trial
TINY_EPOCHS = 3
RUN_TABLES = ("runs", "tags", "params", "metrics", "latest_metrics")  # every table a trial run has rows in
AXES = ("initializer", "scale", "activation", "normalization", "batch_size")
NAMED_AXES = ("initializer", "activation", "normalization")  # also recorded as the config's <axis>.name
BATCH = 8  # trials per recorded training batch (trial_batch_id)
CHUNK = 2000  # trials inserted per executemany
NAME = "reportbench"  # the study's name
UI_BODY = {"run_view_type": "ACTIVE_ONLY", "order_by": ["attributes.start_time DESC"]}
UI_PAGES = (100, 200)  # the experiment page's two runs/search calls
#: ``python -m pipeline`` that prints, as it ends, its peak RSS and its own CPU seconds apart from
#: its children's (the importances helper): the console script itself ends by os._exit.
REPORT_WRAPPER = (
    "import os, resource, sys\n"
    "from pipeline.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
    "own = resource.getrusage(resource.RUSAGE_SELF)\n"
    "print(f'VmHWM_KB={hwm}', f'OWN_CPU_S={own.ru_utime + own.ru_stime}', file=sys.stderr, flush=True)\n"
    "sys.stdout.flush()\n"
    "os._exit(rc)\n"
)


# ---------------------------------------------------------------- the template: a real study
def template_study(folder: Path, name: str, trials: int) -> float:
    """``python -m pipeline run`` of ``trials`` tiny trials into ``folder``; its wall seconds."""
    from bench import pipeline_cmd

    started = time.perf_counter()
    done = subprocess.run(
        pipeline_cmd(folder, name, trials, TINY_EPOCHS, TINY_TRIAL), cwd=ROOT, capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(
            f"the template study failed (rc {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
        )
    return time.perf_counter() - started


# ---------------------------------------------------------------- growing it: MLflow
def read_templates(con: sqlite3.Connection, name: str) -> list[dict[str, Any]]:
    """The template study's trial runs: per run, its rows of every run table (as column dicts)."""
    (experiment_id,) = con.execute("SELECT experiment_id FROM experiments WHERE name = ?", (name,)).fetchone()
    ids = [
        row[0]
        for row in con.execute(
            "SELECT r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            "WHERE r.experiment_id = ? AND t.key = 'initstudy.role' AND t.value = 'trial'",
            (experiment_id,),
        )
    ]
    templates = []
    for run_id in ids:
        rows = {table: _rows(con, table, run_id) for table in RUN_TABLES}
        tags = {r["key"]: r["value"] for r in rows["tags"]}
        templates.append({"run_id": run_id, "trial": int(tags["optuna_trial"]), "rows": rows})
    return sorted(templates, key=lambda t: t["trial"])


def _rows(con: sqlite3.Connection, table: str, run_id: str) -> list[dict[str, Any]]:
    cursor = con.execute(f"SELECT * FROM {table} WHERE run_uuid = ?", (run_id,))
    columns = [c[0] for c in cursor.description]
    return [dict(zip(columns, row)) for row in cursor]


def clone_rows(template: dict, trial: dict) -> dict[str, list[dict[str, Any]]]:
    """The template run's rows for a new trial: ``trial`` has its run id, number, axes, batch,
    time shift (ms) and accuracy factor."""
    old_id, new_id = template["run_id"], trial["run_id"]
    name = f"trial-{trial['number']}-seed-0"
    out: dict[str, list[dict[str, Any]]] = {}
    for table, rows in template["rows"].items():
        out[table] = []
        for row in rows:
            row = {k: v.replace(old_id, new_id) if isinstance(v, str) else v for k, v in row.items()}
            row["run_uuid"] = new_id
            if table == "runs":
                row.update(name=name, start_time=row["start_time"] + trial["shift_ms"])
                row["end_time"] = row["end_time"] and row["end_time"] + trial["shift_ms"]
            elif table in ("metrics", "latest_metrics"):
                row["timestamp"] += trial["shift_ms"]
                if "accuracy" in row["key"] and not row["is_nan"]:
                    row["value"] = min(1.0, max(0.0, row["value"] * trial["factor"]))
            elif table == "tags":
                row["value"] = _tag(row["key"], row["value"], trial, name)
            elif table == "params":
                row["value"] = _param(row["key"], row["value"], trial["axes"])
            out[table].append(row)
    return out


def _tag(key: str, value: str, trial: dict, name: str) -> str:
    return {
        "optuna_trial": str(trial["number"]),
        "mlflow.runName": name,
        "trial_batch_id": trial["batch_id"],
        "trial_batch_index": str(trial["number"] % BATCH),
        "trial_batch": str(BATCH),
    }.get(key, value)


def _param(key: str, value: str, axes: dict) -> str:
    if key in axes:
        return str(axes[key])
    if key.endswith(".name") and key[: -len(".name")] in NAMED_AXES:
        return str(axes[key[: -len(".name")]])
    return value


def insert(con: sqlite3.Connection, batches: dict[str, list[dict[str, Any]]]) -> None:
    for table, rows in batches.items():
        if rows:
            columns = list(rows[0])
            marks = ", ".join("?" * len(columns))
            con.executemany(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",
                [tuple(r[c] for c in columns) for r in rows],
            )


def link_artifacts(artifacts: Path, template_id: str, new_id: str) -> None:
    """The new run's artifact folder: hard links to the template's files."""
    source = artifacts / template_id
    for path in source.rglob("*"):
        if path.is_file():
            target = artifacts / new_id / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)


# ---------------------------------------------------------------- growing it: Optuna
def new_trials(study, count: int, rng: random.Random) -> list[dict]:
    """``count`` new trials: params drawn from the template trials' distributions, a synthetic
    objective, a run id and everything else a clone needs."""
    templates = study.get_trials(deepcopy=False)
    first = len(templates)
    trials = []
    for number in range(first, first + count):
        template = templates[number % first]
        axes = {k: _draw(d, rng) for k, d in template.distributions.items()}
        value = synthetic_accuracy(axes, rng)
        trials.append(
            {
                "number": number,
                "run_id": uuid.uuid4().hex,
                "template": template,
                "axes": axes,
                "value": value,
                "factor": value / template.values[0] if template.values and template.values[0] else 1.0,
                "batch_id": uuid.uuid5(uuid.NAMESPACE_OID, f"batch-{number // BATCH}").hex,
                "shift_ms": (number - first + 1) * 150,
            }
        )
    return trials


def _draw(distribution, rng: random.Random):
    if hasattr(distribution, "choices"):
        return rng.choice(distribution.choices)
    low, high = distribution.low, distribution.high
    if getattr(distribution, "log", False):
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    return rng.uniform(low, high)


def synthetic_accuracy(axes: dict, rng: random.Random) -> float:
    """Something like the tiny study's accuracies: batch norm helps, scales far from 1 hurt."""
    accuracy = 0.55 + (0.12 if axes.get("normalization") == "batch" else 0.0)
    accuracy -= 0.08 * abs(math.log2(float(axes.get("scale", 1.0))))
    return min(0.95, max(0.1, accuracy + rng.gauss(0.0, 0.03)))


def append_optuna_trials(journal: Path, name: str, trials: list[dict]) -> None:
    """The new trials, through Optuna's own journal storage (its records, its format), appended
    to the journal file in one write."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import BaseJournalBackend, JournalFileBackend

    class Recorder(BaseJournalBackend):
        """The file's records, plus what Optuna appends, held until ``flush``."""

        def __init__(self, backend: JournalFileBackend) -> None:
            self.backend, self.logs, self.pending = backend, list(backend.read_logs(0)), []

        def read_logs(self, log_number_from: int):
            return self.logs[log_number_from:]

        def append_logs(self, logs: list) -> None:
            self.logs.extend(logs)
            self.pending.extend(logs)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    recorder = Recorder(JournalFileBackend(str(journal)))
    study = optuna.load_study(study_name=name, storage=JournalStorage(recorder))
    objective = next(
        (k[: -len("_per_seed")] for k in trials[0]["template"].user_attrs if k.endswith("_per_seed")), None
    )
    frozen = []
    for t in trials:
        attrs = {**t["template"].user_attrs, "run_ids": [t["run_id"]]}
        if objective:
            attrs[f"{objective}_per_seed"] = [t["value"]]
        frozen.append(
            optuna.trial.create_trial(
                params=t["axes"],
                distributions=t["template"].distributions,
                value=t["value"],
                user_attrs=attrs,
                system_attrs=t["template"].system_attrs,
            )
        )
    study.add_trials(frozen)
    recorder.backend.append_logs(recorder.pending)


def grow(folder: Path, name: str, total: int, seed: int = 0) -> dict:
    """Grow the template study in ``folder`` to ``total`` trials (see the module's docstring)."""
    import optuna

    from pipeline.study.storage import open_storage

    started = time.perf_counter()
    journal = folder / "studies" / name / "optuna.journal"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=open_storage(str(journal)))
    trials = new_trials(study, total - len(study.get_trials(deepcopy=False)), random.Random(seed))
    con = sqlite3.connect(folder / "mlflow.db")
    con.execute("PRAGMA journal_mode=DELETE")  # one large transaction: no write-ahead log of its size
    con.execute("PRAGMA synchronous=OFF")
    templates = {t["trial"]: t for t in read_templates(con, name)}
    for start in range(0, len(trials), CHUNK):
        batches: dict[str, list] = {table: [] for table in RUN_TABLES}
        for trial in trials[start : start + CHUNK]:
            template = templates[trial["template"].number]
            for table, rows in clone_rows(template, trial).items():
                batches[table].extend(rows)
            link_artifacts(folder / "artifacts", template["run_id"], trial["run_id"])
        insert(con, batches)
    con.commit()
    con.execute("PRAGMA journal_mode=WAL")  # as the project makes its stores
    con.close()
    if trials:
        append_optuna_trials(journal, name, trials)
    return {"grown_trials": len(trials), "grow_s": time.perf_counter() - started}


# ---------------------------------------------------------------- the measurements
def report_time(folder: Path, name: str) -> dict:
    """`python -m pipeline report` of the study: wall, CPU (with its importances helper), peak RSS."""
    cmd = [
        sys.executable, "-c", REPORT_WRAPPER, "report", name, f"study.output_dir={folder}/studies",
        f"tracking.uri=sqlite:///{folder}/mlflow.db", f"tracking.artifact_root={folder}/artifacts",
    ]  # fmt: skip
    load_before = os.getloadavg()[0]
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    ending = dict(
        f.split("=") for line in done.stderr.splitlines() if line.startswith("VmHWM_KB=") for f in line.split()
    )
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    out = {
        "wall_s": wall,
        "cpu_s": cpu,
        "report_process_cpu_s": float(ending.get("OWN_CPU_S", "nan")),  # the rest: the importances helper
        "peak_rss_mb": int(ending["VmHWM_KB"]) / 1024 if ending else None,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "rc": done.returncode,
    }
    if done.returncode:
        print(done.stderr[-3000:], file=sys.stderr)
    return out


def ui_listing(folder: Path, name: str, trials: int, port: int, repeats: int = 3) -> dict:
    """The runs-search calls of the UI's experiment page on ``mlflow server`` over the store:
    the first call (cold), then the median of ``repeats`` of each page size, and a page halfway."""
    from mlflow.utils.search_utils import SearchUtils

    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
    ]  # fmt: skip
    with (folder / "server.log").open("w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_healthy(url, server)
        with sqlite3.connect(f"file:{folder}/mlflow.db?mode=ro", uri=True) as con:
            (experiment_id,) = con.execute("SELECT experiment_id FROM experiments WHERE name = ?", (name,)).fetchone()
        body = {**UI_BODY, "experiment_ids": [str(experiment_id)]}
        out: dict[str, Any] = {"first_call_s": _search(url, {**body, "max_results": UI_PAGES[0]})[0]}
        for size in UI_PAGES:
            timings = [_search(url, {**body, "max_results": size}) for _ in range(repeats)]
            out[f"page_{size}_s"] = statistics.median(t for t, _ in timings)
            out[f"page_{size}_runs"] = timings[0][1]
        later = {**body, "max_results": UI_PAGES[0], "page_token": _token(SearchUtils.create_page_token(trials // 2))}
        timings = [_search(url, later) for _ in range(repeats)]
        out["later_page_offset"] = trials // 2
        out["later_page_s"] = statistics.median(t for t, _ in timings)
        return out
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers: its own session, started here
        server.wait(timeout=60)


def _token(token) -> str:
    return token.decode() if isinstance(token, bytes) else token


def _wait_healthy(url: str, server: subprocess.Popen, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"mlflow server exited (rc {server.returncode})")
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).read().strip() == b"OK":
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"mlflow server gave no /health answer in {timeout_s:.0f} s")


def _search(url: str, body: dict) -> tuple[float, int]:
    request = urllib.request.Request(
        f"{url}/ajax-api/2.0/mlflow/runs/search",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as answer:
        runs = json.loads(answer.read()).get("runs", [])
    return time.perf_counter() - started, len(runs)


def bench_study(trials: int, args) -> dict:
    """One study of ``trials`` trials: the template study run for real, grown to that size, measured."""
    folder = Path(tempfile.mkdtemp(prefix=f"bench_report_{trials}_"))
    out = {"trials": trials, "folder": str(folder), "template_s": template_study(folder, NAME, args.template)}
    out.update(grow(folder, NAME, trials))
    out["store_mb"] = (folder / "mlflow.db").stat().st_size / 2**20
    out["report"] = report_time(folder, NAME)
    if args.ui:
        out["ui"] = ui_listing(folder, NAME, trials, args.port)
    print_study(out)
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return out


def print_study(s: dict) -> None:
    r = s["report"]
    print(
        f"{s['trials']:,} trials (grown in {s['grow_s']:.0f} s, store {s['store_mb']:.0f} MB): report {r['wall_s']:.1f} s "
        f"wall, {r['cpu_s']:.1f} CPU-s ({r['report_process_cpu_s']:.1f} in the report's process, the rest in its "
        f"importances helper), peak RSS {r['peak_rss_mb'] or 0:.0f} MB, load "
        f"{r['load_before']:.1f} -> {r['load_after']:.1f} (rc {r['rc']})"
    )
    if "ui" in s:
        u = s["ui"]
        print(
            f"  MLflow UI runs/search: first call {u['first_call_s']:.2f} s; page of {UI_PAGES[0]} "
            f"{u[f'page_{UI_PAGES[0]}_s']:.2f} s, of {UI_PAGES[1]} {u[f'page_{UI_PAGES[1]}_s']:.2f} s; a page at "
            f"offset {u['later_page_offset']:,} {u['later_page_s']:.2f} s"
        )


def _counts(text: str) -> list[int]:
    counts = [int(part) if part.strip().isdigit() else -1 for part in text.split(",") if part.strip()]
    if not counts or any(n <= 0 for n in counts):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive trial counts, e.g. 10000,100000")
    return sorted(counts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=_counts, default=[10000, 100000], help="study sizes (trials)")
    ap.add_argument("--template", type=int, default=8, help="tiny trials run for real, then copied")
    ap.add_argument("--ui", action="store_true", help="also time the MLflow UI's runs listing")
    ap.add_argument("--port", type=int, default=5079, help="--ui's mlflow server port (127.0.0.1)")
    ap.add_argument("--keep", action="store_true", help="keep the studies' folders (printed)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    if any(n < args.template for n in args.trials):
        ap.error(f"every --trials count must be at least --template ({args.template})")
    figures = {"machine": f"{os.cpu_count()} CPUs", "template_trials": args.template}
    figures["studies"] = [bench_study(trials, args) for trials in args.trials]
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
