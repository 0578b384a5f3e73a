"""The commands: thin wrappers that compose a config (pipeline/config/) and call one layer.

``python -m pipeline trial [overrides]``      one trial, recorded in MLflow
``python -m pipeline run [overrides]``        a study (Optuna trials on Ray workers)
``python -m pipeline reproduce RUN_ID``       re-run a recorded trial from its logged config
``python -m pipeline report STUDY``           build a study's report (figures + HTML), log it to the study run

``python -m pipeline [COMMAND] --help`` says what each does and lists every config group's choices.

Bad input of any kind (unknown name, malformed override, invalid value, missing data) is one
line on stderr and exit code 2, before any training and before any MLflow run is opened.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable

from pipeline.config import ConfigError, compose

USAGE = (
    "usage: python -m pipeline (or initstudy) [run|trial|reproduce|report] [--cfg job] [--config-dir DIR] "
    "[overrides | RUN_ID | STUDY]; no command: run (the default study)"
)
HELP_FLAGS = ("-h", "--help")


def trial_command(args: list[str]) -> int:
    from pipeline.record import run_recorded_trial

    config = compose(args)
    done = run_recorded_trial(config)
    print(_trial_summary(done, config["tracking"]["uri"]))
    return 0


def _trial_summary(done, tracking_uri: str) -> str:
    r = done.result
    state = f"diverged at epoch {r.diverged_epoch}" if r.diverged else "converged" if r.epochs_to_target else "finished"
    return (
        f"final_accuracy={r.final_accuracy:.4f} best_val_accuracy={r.best_val_accuracy:.4f} "
        f"diverged={str(r.diverged).lower()} ({state}, {r.epochs_run} epochs, {r.wall_time_s:.1f} s)\n"
        f"run_id={done.run_id} experiment={done.experiment}\n"
        f"mlflow: {_ui_address(tracking_uri, done.run_id)}"
    )


def reproduce_command(args: list[str]) -> int:
    from pipeline.record.reproduce import reproduce
    from pipeline.record.uris import check_reachable

    if not args or "=" in args[0]:
        raise ConfigError(
            "reproduce needs a RUN_ID first; e.g. python -m pipeline reproduce 3f2a... [tracking.uri=...]"
        )
    run_id, overrides = args[0], args[1:]
    # Only the store is chosen here; anything else would be silently ignored, so refuse it.
    others = [o for o in overrides if o.partition("=")[0] not in ("tracking", "tracking.uri")]
    if others:
        raise ConfigError(
            f"reproduce re-runs the logged config as it was; it takes only tracking.uri=... "
            f"(or tracking=<name>), got: {' '.join(others)}"
        )
    uri = compose(overrides)["tracking"]["uri"]
    check_reachable(uri)
    done, comparison = reproduce(run_id, uri)
    print(_trial_summary(done, uri))
    print(comparison)
    return 0


def run_command(args: list[str]) -> int:
    from pipeline.study import StudyFailed, run_study

    try:
        done = run_study(args)
    except StudyFailed as err:
        if err.done is not None:
            _study_report(err.done)
        print(f"error: {err}", file=sys.stderr)
        return 1
    _study_report(done)
    print(f"mlflow: {_ui_address(done.tracking_uri, done.parent_run_id, experiment_page=True)}")
    return 0


def _ui_address(uri: str, run_id: str, experiment_page: bool = False) -> str:
    from pipeline.record.store import ui_address

    return ui_address(uri, run_id, experiment_page)


def _study_report(done) -> None:
    """Build the report of a study that has ended (``study.report``); its failure is a warning
    and a tag on the study's run, not a failed study."""
    if not done.report:
        return
    from pipeline.config import one_line
    from pipeline.record import names
    from pipeline.record.runs import tag_run
    from pipeline.report import build_report

    try:
        path = build_report(done.name, done.tracking_uri, done.output_dir, storage=done.storage)
        print(f"report: {path}", file=sys.stdout)
    except Exception as err:
        reason = f"{type(err).__name__}: {one_line(err, 500)}"
        tag_run(done.tracking_uri, done.parent_run_id, {names.REPORT_ERROR_TAG: reason})
        print(
            f"warning: the study report failed ({reason}); rebuild it with python -m pipeline report {done.name}",
            file=sys.stderr,
        )


def report_command(args: list[str]) -> int:
    from pipeline.config.catalog import check_study_name
    from pipeline.record.uris import check_reachable
    from pipeline.report import build_report

    if not args or "=" in args[0]:
        raise ConfigError(
            "report needs a STUDY name first; e.g. python -m pipeline report demo "
            "[tracking.uri=...] [study.output_dir=...]"
        )
    study, overrides = args[0], args[1:]
    check_study_name(study)
    config = compose(overrides)
    check_reachable(config["tracking"]["uri"])
    study_cfg = config["study"]
    path = build_report(study, config["tracking"]["uri"], study_cfg["output_dir"], storage=study_cfg["storage"])
    print(f"report: {path} (also logged to the study's MLflow run under report/)")
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "run": run_command,
    "trial": trial_command,
    "reproduce": reproduce_command,
    "report": report_command,
}

#: ``python -m pipeline COMMAND --help``: what it does, and an example.
COMMAND_HELP = {
    "run": (
        "a study: Optuna asks, Ray runs the trials, MLflow records (parent run = study, child = trial)",
        "python -m pipeline run space.initializer='choice(xavier_normal,kaiming_normal)' study.n_trials=20",
    ),
    "trial": (
        "one trial, recorded in MLflow; prints its final accuracy, whether it diverged, and its run id",
        "python -m pipeline trial initializer=orthogonal scale=0.5 activation=tanh normalization=batch",
    ),
    "reproduce": (
        "re-run a recorded trial from its logged config and compare every curve with the record",
        "python -m pipeline reproduce RUN_ID [tracking.uri=...]",
    ),
    "report": (
        "build a study's report (figures and HTML) and log it to the study's parent run",
        "python -m pipeline report STUDY [tracking.uri=...] [study.output_dir=...]",
    ),
}

#: Config groups whose choices the help lists (each is a folder of conf/).
HELP_GROUPS = ("initializer", "activation", "normalization", "model", "dataset", "optimizer", "space", "experiment")


def help_text(command: str | None = None) -> str:
    """The usage, the commands (or one of them), and every group's choices, read from conf/."""
    from pipeline.config import group_options

    commands = [command] if command else list(COMMANDS)
    lines = [USAGE, ""] + [
        f"  {name:<10} {COMMAND_HELP[name][0]}\n  {'':<10} e.g. {COMMAND_HELP[name][1]}" for name in commands
    ]
    lines += [
        "",
        "Overrides are Hydra's key=value; the study axes: initializer, scale, activation, normalization,",
        "batch_size (and any config key). Choices of each group:",
    ]
    lines += [f"  {group}: {', '.join(group_options(group))}" for group in HELP_GROUPS]
    lines += ["", "More: README.md (commands, keys, cluster, results)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return _main(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # every run was ended (KILLED) on the way out
        print("interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    # Hydra's own options may stand anywhere, before the command too.
    config_dirs, argv = _take_option(argv, "--config-dir", "-cd")
    shown, argv = _take_option(argv, "--cfg", "-c")
    command = argv[0] if argv else "run"
    if command in HELP_FLAGS:
        print(help_text())
        return 0
    if command not in COMMANDS:
        raise ConfigError(f"unknown command '{command}'; valid: {', '.join(COMMANDS)} ({USAGE})")
    if any(arg in HELP_FLAGS for arg in argv[1:]):  # Hydra would read "--help" as a malformed override
        print(help_text(command))
        return 0
    from pipeline.config.composition import add_config_dir

    for folder in config_dirs:
        add_config_dir(folder)
    if shown:
        return print_config(command, shown[-1], argv[1:])
    return COMMANDS[command](argv[1:])


def _take_option(args: list[str], *names: str) -> tuple[list[str], list[str]]:
    """Every value of ``NAME VALUE`` or ``NAME=VALUE`` for the option ``names``, and the other args."""
    values, rest, pending = [], [], False
    for arg in args:
        if pending:
            values.append(arg)
            pending = False
        elif arg in names:
            pending = True
        elif arg.partition("=")[0] in names:
            values.append(arg.partition("=")[2])
        else:
            rest.append(arg)
    if pending:
        raise ConfigError(f"{args[-1]} needs a value; e.g. --cfg job, --config-dir ./my_conf")
    return values, rest


CFG_MODES = ("job", "all")


def print_config(command: str, mode: str, args: list[str]) -> int:
    """``--cfg job``: print the composed, resolved and checked config of ``run`` or ``trial``, then exit.

    ``all`` prints the same: initstudy composes no Hydra runtime section (``hydra:``) to add.
    """
    import yaml

    if mode not in CFG_MODES:
        raise ConfigError(f"--cfg {mode} is invalid; valid: {', '.join(CFG_MODES)}")
    if command not in ("run", "trial"):
        raise ConfigError(f"--cfg shows the config of run or trial; {command} re-reads a recorded one")
    if command == "run":
        from pipeline.study.plan import plan_study

        config = plan_study(args).base_config
    else:
        from pipeline.config import config_from_dict, validate

        config = compose(args)
        validate(config_from_dict(config))
    print(yaml.safe_dump(config, sort_keys=False), end="")
    return 0


def _stop_on_sigterm() -> None:
    """A stop from outside (``kill``, ``ray job stop``, a batch system's time limit: SIGTERM) ends the
    command as Ctrl-C does: its runs ended KILLED, its study's record whole and resumable."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def console() -> None:
    """The ``initstudy`` console script and ``python -m pipeline``: run the command, then leave.

    Everything is recorded and Ray is shut down by then; unloading torch, Ray and MLflow module by
    module at interpreter exit costs another second, so the process ends at once (output flushed).
    """
    _stop_on_sigterm()
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(rc)
