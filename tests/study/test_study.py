"""Studies on a real local Ray with real sqlite Optuna and MLflow stores (no mocks)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pipeline.cli import main
from pipeline.study import space
from pipeline.study.grouping import task_cost
from pipeline.study.loop import run_study
from pipeline.study.optuna_journal import SNAPSHOT_SUFFIX
from pipeline.study.plan import TPE_STARTUP_TRIALS, plan_study
from pipeline.study.storage import default_storage, open_storage

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", autouse=True)
def _ray(local_ray):
    yield


@pytest.fixture
def study_args(tmp_path):
    def args(name: str, *extra: str) -> list[str]:
        return [
            f"study.name={name}",
            f"study.output_dir={tmp_path}/studies",
            "study.progress=false",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"tracking.artifact_root={tmp_path}/artifacts",
            "cluster.num_cpus=2",
            "model.depth=2",
            "model.width=32",
            "train.epochs=2",
            "train.probe_size=64",
            "study.report=false",
            "tracking.log_weights=false",
            *extra,
        ]

    args.tmp_path = tmp_path
    return args


def optuna_study(study_args, name):
    return optuna.load_study(
        study_name=name, storage=open_storage(default_storage(f"{study_args.tmp_path}/studies", name))
    )


def mlflow_runs(study_args, name):
    client = MlflowClient(f"sqlite:///{study_args.tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("initstudy.role") == "study"]
    children = [r for r in runs if r.data.tags.get("initstudy.role") == "trial"]
    return client, parents, children


def test_study_with_seeds_records_parent_children_and_spread(study_args):
    run_study(study_args("seeds", "study.n_trials=3", "study.seeds=2", "study.sampler=random"))
    study = optuna_study(study_args, "seeds")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    for trial in study.trials:
        per_seed = trial.user_attrs["val_accuracy_per_seed"]
        assert len(per_seed) == 2 and trial.value == pytest.approx(sum(per_seed) / 2)
        assert trial.user_attrs["val_accuracy_std"] >= 0
    client, parents, children = mlflow_runs(study_args, "seeds")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 6
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {(c.data.tags["optuna_trial"], c.data.tags["seed"]) for c in children} == {
        (str(n), str(s)) for n in range(3) for s in (0, 1)
    }
    assert all(c.info.status == "FINISHED" and c.data.tags["optuna_state"] == "COMPLETE" for c in children)
    assert all(c.data.tags["ray_node"] and c.data.params["initializer"] for c in children)
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"summary.md", "trials.csv", "study_config.yaml"} <= artifacts
    assert parents[0].data.metrics["n_complete"] == 3


def test_grid_sampler_covers_the_grid_exactly_once(study_args):
    run_study(study_args("grid", "space=axes_grid", "study.sampler=grid", "study.n_trials=null"))
    study = optuna_study(study_args, "grid")
    seen = sorted((t.params["initializer"], t.params["scale"]) for t in study.trials)
    assert seen == sorted(itertools.product(["xavier_normal", "kaiming_normal"], [0.5, 1.0, 2.0]))


def test_pruned_trials_are_pruned_in_optuna_and_tagged_in_mlflow(study_args):
    run_study(
        study_args(
            "prune",
            "study.pruner=median",
            "study.sampler=random",
            "study.n_trials=10",
            "train.epochs=4",
            "space.initializer=choice(zeros, kaiming_normal)",
            "~space.scale",
            "~space.normalization",
            "~space.activation",
            "~space.batch_size",
            "cluster.max_concurrent=1",
        )
    )
    pruned = [t for t in optuna_study(study_args, "prune").trials if t.state == TrialState.PRUNED]
    assert pruned, "a zero-initialized net below the median should have been pruned"
    _, _, children = mlflow_runs(study_args, "prune")
    by_trial = {int(c.data.tags["optuna_trial"]): c for c in children}
    for trial in pruned:
        run = by_trial[trial.number]
        assert run.data.tags["pruned"] == "true" and run.data.tags["optuna_state"] == "PRUNED"
        assert run.info.status == "FINISHED"
        assert "val_accuracy" in run.data.metrics  # its curve is kept


def test_failing_trials_are_recorded_and_the_study_goes_on(study_args):
    run_study(
        study_args(
            "fail",
            "study.n_trials=4",
            "study.sampler=random",
            "normalization.groups=7",
            "study.max_failure_rate=1.0",
            "space.normalization=choice(none, group)",
        )
    )
    trials = optuna_study(study_args, "fail").trials
    assert len(trials) == 4
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert all("groups=7" in t.user_attrs["failure_reason"] for t in failed)
    assert all(t.state == TrialState.COMPLETE for t in trials if t.params["normalization"] == "none")
    _, _, children = mlflow_runs(study_args, "fail")
    assert len(children) == 4 and not [c for c in children if c.info.status == "RUNNING"]
    for child in children:
        if child.data.tags["optuna_state"] == "FAIL":
            assert child.info.status == "FAILED" and "groups=7" in child.data.tags["failure_reason"]


def test_too_many_failures_stop_the_study_with_a_clear_error_and_a_report_of_what_ran(study_args, capsys):
    code = main(
        [
            "run",
            *study_args(
                "allfail",
                "study.n_trials=6",
                "normalization=group",
                "normalization.groups=7",
                "~space.normalization",
                "study.min_trials_for_failure_rate=2",
                "study.report=true",
            ),
        ]
    )
    assert code == 1
    out, err = capsys.readouterr()
    assert "2 of 2 trials failed (> study.max_failure_rate=0.5)" in err
    # A trial already finished when the study stops is still told, so the summary may count more.
    summary = re.search(r"## Study allfail: 0 complete, 0 pruned, (\d+) failed", out)
    assert summary and 2 <= int(summary[1]) < 6 and "report: " in out
    client, parents, children = mlflow_runs(study_args, "allfail")
    assert parents[0].info.status == "FAILED" and "max_failure_rate" in parents[0].data.tags["failure_reason"]
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"summary.md", "trials.csv", "report"} <= artifacts
    assert not [c for c in children if c.info.status == "RUNNING"]


def test_rerun_resumes_the_study_and_reuses_the_parent_run(study_args):
    run_study(study_args("resume", "study.n_trials=2", "study.sampler=random"))
    first = optuna_study(study_args, "resume").trials
    # The study left a snapshot of its journal: the rerun replays only the records after it.
    assert Path(default_storage(f"{study_args.tmp_path}/studies", "resume") + SNAPSHOT_SUFFIX).is_file()
    run_study(study_args("resume", "study.n_trials=4", "study.sampler=random"))
    trials = optuna_study(study_args, "resume").trials
    assert len(trials) == 4 and [t.params for t in trials[:2]] == [t.params for t in first]
    _, parents, children = mlflow_runs(study_args, "resume")
    assert len(parents) == 1 and len(children) == 4


def test_a_resume_fails_the_runs_a_dead_driver_finished_but_never_told(study_args):
    """A driver killed between a run's last write and Optuna's tell leaves a FINISHED run of a
    RUNNING trial: the trial is run again, so that run ends FAILED like the trial."""
    run_study(study_args("untold", "study.n_trials=2", "study.sampler=random"))
    study = optuna_study(study_args, "untold")
    left = study.ask(fixed_distributions=study.trials[0].distributions)  # RUNNING, as the dead driver left it
    client, parents, _ = mlflow_runs(study_args, "untold")
    tags = {"optuna_trial": str(left.number), "initstudy.role": "trial", "mlflow.parentRunId": parents[0].info.run_id}
    finished = client.create_run(parents[0].info.experiment_id, tags=tags).info.run_id
    client.set_terminated(finished, "FINISHED")
    run_study(study_args("untold", "study.n_trials=3", "study.sampler=random"))
    assert [t.state for t in optuna_study(study_args, "untold").trials].count(TrialState.COMPLETE) == 3
    run = client.get_run(finished)
    assert run.info.status == "FAILED" and run.data.tags["optuna_state"] == "FAIL"
    assert run.data.tags["failure_reason"] == "the driver stopped mid-trial"


def test_same_sampler_seed_gives_the_same_trials_in_the_same_order(study_args):
    run_study(study_args("order_a", "study.n_trials=3", "study.seed=5"))
    run_study(study_args("order_b", "study.n_trials=3", "study.seed=5"))
    params = [[t.params for t in optuna_study(study_args, n).trials] for n in ("order_a", "order_b")]
    assert params[0] == params[1]


def test_tpe_start_up_trials_train_together_and_are_the_ones_it_draws_one_by_one(study_args):
    axes = [
        "space=empty",
        "space.initializer=choice(xavier_normal, kaiming_normal, orthogonal)",
        "space.scale=interval(0.5, 2.0)",
        "study.sampler=tpe",
        "study.seed=3",
    ]
    run_study(study_args("tpe", *axes, "study.n_trials=12"))
    trials = optuna_study(study_args, "tpe").trials
    # Asked one by one, each told before the next is asked: TPE's first 10 are drawn at random.
    plan = plan_study(study_args("tpe_reference", *axes, "study.n_trials=12"))
    reference = optuna.create_study(sampler=plan.sampler)
    for _ in range(TPE_STARTUP_TRIALS):
        trial = reference.ask()
        space.suggest(trial, plan.axes)
        reference.tell(trial, 0.5)
    assert [t.params for t in trials[:TPE_STARTUP_TRIALS]] == [t.params for t in reference.trials]
    _, _, children = mlflow_runs(study_args, "tpe")
    batch = {int(c.data.tags["optuna_trial"]): c.data.tags.get("trial_batch") for c in children}
    # One shape, 2 slots: the 10 start-up trials in two tasks of 5; then one trial per free slot.
    assert [batch[n] for n in range(12)] == ["5"] * 10 + [None, None]


def test_bad_space_fails_before_any_record(study_args, capsys):
    code = main(["run", *study_args("bad", "space.scale=interval(4, 1)")])
    assert code == 2 and "low > high" in capsys.readouterr().err
    assert not (study_args.tmp_path / "mlflow.db").exists()  # nothing recorded, nothing to clean up


def test_a_diverging_trial_is_a_result_and_the_study_goes_on(study_args):
    run_study(
        study_args(
            "diverge",
            "study.sampler=grid",
            "study.n_trials=null",
            "space=empty",
            "space.optimizer.lr=choice(0.05, 100000000.0)",
            "scale=20",
        )
    )
    trials = optuna_study(study_args, "diverge").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    by_lr = {t.params["optimizer.lr"]: t for t in trials}
    assert by_lr[1e8].value < 0.2 and by_lr[1e8].user_attrs["diverged_seeds"] == 1
    _, _, children = mlflow_runs(study_args, "diverge")
    tags = {c.data.params["optimizer.lr"]: c.data.tags for c in children}
    assert tags["100000000.0"]["diverged"] == "true" and tags["100000000.0"]["diverged_epoch"] == "1"
    assert tags["0.05"]["diverged"] == "false"


def test_multi_objective_study_keeps_both_values_and_a_pareto_front(study_args):
    done = run_study(
        study_args(
            "multi",
            "study.n_trials=3",
            "study.sampler=nsga2",
            "study.objectives=[val_accuracy,epochs_to_target]",
            "train.target_accuracy=0.5",
        )
    )
    study = optuna_study(study_args, "multi")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert all(len(t.values) == 2 for t in study.trials)
    assert "epochs_to_target (mean ± std, n)" in done.summary["text"]


@pytest.mark.parametrize("pruner", ["successive_halving", "hyperband"])
def test_other_pruners_run_and_end_every_trial(study_args, pruner):
    run_study(
        study_args(
            f"p_{pruner}", f"study.pruner={pruner}", "study.n_trials=4", "train.epochs=3", "study.sampler=random"
        )
    )
    states = {t.state for t in optuna_study(study_args, f"p_{pruner}").trials}
    assert states <= {TrialState.COMPLETE, TrialState.PRUNED}
    _, _, children = mlflow_runs(study_args, f"p_{pruner}")
    assert len(children) == 4 and not [c for c in children if c.info.status == "RUNNING"]


def _by_member(children) -> dict:
    return {(c.data.params["initializer.name"], c.data.params["scale"], c.data.tags["seed"]): c for c in children}


def test_trial_batching_trains_members_together_with_the_results_they_get_alone(study_args):
    grid = ["space=axes_grid", "study.sampler=grid", "study.n_trials=null", "study.seeds=2"]
    run_study(study_args("batched", *grid))
    run_study(study_args("alone", *grid, "study.trial_batching=false"))
    _, _, batched = mlflow_runs(study_args, "batched")
    _, _, alone = mlflow_runs(study_args, "alone")
    assert len(batched) == len(alone) == 12 and {c.info.status for c in batched + alone} == {"FINISHED"}
    # 12 members of one shape, 2 slots: two Ray tasks of 6, each member in its own run.
    assert [c.data.tags.get("trial_batch") for c in batched] == ["6"] * 12
    assert all("trial_batch" not in c.data.tags for c in alone)
    together, apart = _by_member(batched), _by_member(alone)
    assert together.keys() == apart.keys()
    for member, run in together.items():
        for metric in ("final_val_accuracy", "final_accuracy", "val_loss", "init_act_std_ratio"):
            assert run.data.metrics[metric] == pytest.approx(apart[member].data.metrics[metric], rel=1e-4, abs=1e-5), (
                member,
                metric,
            )
    values = {
        t.params["initializer"] + str(t.params["scale"]): t.value for t in optuna_study(study_args, "batched").trials
    }
    assert values == pytest.approx(
        {t.params["initializer"] + str(t.params["scale"]): t.value for t in optuna_study(study_args, "alone").trials},
        abs=1e-5,
    )


def test_batched_tasks_start_costliest_first_and_max_concurrent_holds(study_args):
    axes = [
        "space=empty",
        "space.batch_size=choice(16, 64, 256)",
        "space.normalization=choice(none, batch)",
        "space.initializer=choice(xavier_normal, kaiming_normal)",
        "study.sampler=random",
    ]
    run_study(study_args("order", *axes, "study.n_trials=18", "train.epochs=1", "cluster.max_concurrent=1"))
    _, _, children = mlflow_runs(study_args, "order")
    tasks: dict[str, list] = {}
    for child in children:
        tasks.setdefault(child.data.tags.get("trial_batch_id", child.info.run_id), []).append(
            child
        )  # alone: no batch id
    assert len(tasks) >= 4  # one per (batch size, normalization) drawn
    started = sorted(tasks.values(), key=lambda runs: min(r.info.start_time for r in runs))
    costs = [task_cost([_cost_config(r) for r in runs]) for runs in started]
    # One slot: Ray runs the tasks one after another in the order the driver sent them.
    assert costs == sorted(costs, reverse=True)
    spans = [(min(r.info.start_time for r in runs), max(r.info.end_time for r in runs)) for runs in started]
    assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(spans))  # never two at once


def test_the_progress_bar_tells_running_from_queued_trials(study_args, capsys):
    run_study(
        study_args(
            "bar",
            "space=empty",
            "space.initializer=choice(xavier_normal, kaiming_normal)",
            "study.sampler=random",
            "study.n_trials=5",
            "train.epochs=1",
            "study.trial_batching=false",
            "cluster.max_concurrent=1",
            "study.progress=true",
        )
    )
    err = capsys.readouterr().err
    bars = re.findall(r"running=(\d+), queued=(\d+), failed=(\d+)", err)
    assert bars and all(int(running) <= 1 for running, _, _ in bars)  # one slot: one trial trains at a time
    assert any(int(queued) >= 1 for _, queued, _ in bars)  # asked ahead, waiting in the driver
    bests = [float(b) for b in re.findall(r"best=([0-9.]+)", err)]
    assert bests == sorted(bests) and bests[-1] == pytest.approx(optuna_study(study_args, "bar").best_value, abs=1e-4)


def _cost_config(run) -> dict:
    params = run.data.params
    return {
        "model": {"depth": 2, "width": 32},
        "train": {"epochs": 1},
        "batch_size": int(params["batch_size"]),
        "normalization": {"name": params["normalization"]},
    }


def test_a_trials_runs_are_tagged_again_only_where_their_own_result_disagrees_with_optunas_state():
    """Each run is tagged with its own result's state as it ends: one write per trial is saved
    when that is already Optuna's final state; a pruned seed, a retry's dead attempt, overrule it."""
    from types import SimpleNamespace

    from pipeline.study.study_run import state_tags, untagged_runs

    results = {0: {"run_key": "seed0", "pruned": False}, 1: {"run_key": "seed1", "pruned": True}}
    pruned = SimpleNamespace(number=0, state=TrialState.PRUNED)
    assert untagged_runs(pruned, results, ["seed0", "seed1", "seed1-dead-attempt"]) == ["seed0", "seed1-dead-attempt"]
    assert state_tags(pruned) == {"optuna_state": "PRUNED"}
    complete = SimpleNamespace(number=1, state=TrialState.COMPLETE)
    both = {0: {"run_key": "a", "pruned": False}, 1: {"run_key": "b", "pruned": False}}
    assert untagged_runs(complete, both, ["a", "b"]) == []
