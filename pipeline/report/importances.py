"""Optuna's fANOVA parameter importances for the study report, computed beside it.

Optuna's fANOVA evaluator imports scikit-learn, which imports SciPy's statistics (~2 s, most of it
SciPy rewriting its docstrings), then fits a 64-tree forest (~0.5 s): a third of the report's time
when done in line. ``Importances`` starts that work in a helper process as soon as the study's
trials are known and the report draws its other figures meanwhile; where the helper cannot run or
fails, the same call runs in this process. Same trials, same evaluator seed: the same numbers.

The helper is ``python -m pipeline.report.importances PAYLOAD`` (a pickle of the trials that this
process wrote), not ``multiprocessing``, which would import the caller's ``__main__`` again.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

HELPER_MODULE = "pipeline.report.importances"
HELPER_TIMEOUT_S = 300.0
#: Complete trials the evaluator weighs, at most: its forest of fully grown trees and the fANOVA
#: decomposition over every split cost more than linearly in the trials (~6 CPU-s at 500 trials,
#: ~14 at 1,000, ~33 at 2,000 on 2 busy CPUs). Past it, a fixed random draw of this many.
MAX_TRIALS = 1000
_ROOT = Path(__file__).resolve().parents[2]  # where ``pipeline`` can be imported from


class NothingToWeigh(ValueError):
    """Too few complete trials, or no axis that varies across them: why there is no figure."""


class EvaluatorError(RuntimeError):
    """Optuna's evaluator raised (in the helper): its type and message."""


def inputs(optuna_study, max_trials: int = MAX_TRIALS) -> dict:
    """What the evaluator needs from a study: its complete trials (at most ``max_trials``:
    ``weighed``), its directions, the axes that vary.

    Raises ``NothingToWeigh`` (saying why) when importances cannot be computed.
    """
    complete = [t for t in optuna_study.get_trials(deepcopy=False) if t.state.name == "COMPLETE" and t.values]
    if len(complete) < 2:
        raise NothingToWeigh(f"parameter importances need at least 2 complete trials; this study has {len(complete)}")
    trials = weighed(complete, max_trials)
    varying = sorted(
        k for k in {k for t in trials for k in t.params} if len({repr(t.params.get(k)) for t in trials}) > 1
    )
    if not varying:
        raise NothingToWeigh("no study axis varies across the complete trials")
    return {"trials": trials, "directions": [d.name.lower() for d in optuna_study.directions], "params": varying}


def weighed(complete: list, max_trials: int = MAX_TRIALS) -> list:
    """The complete trials the evaluator weighs: all of them, or past ``max_trials`` a draw of that
    many at random (seed 0: the same draw for the same trials), in trial order."""
    if len(complete) <= max_trials:
        return complete
    return sorted(random.Random(0).sample(complete, max_trials), key=lambda t: t.number)


def weighed_note(used: int, complete: int) -> str:
    """What the figure says when the evaluator weighed a draw of the complete trials ("" otherwise)."""
    if used >= complete:
        return ""
    return (
        f"Weighed over {used:,} of the study's {complete:,} complete trials, drawn at random (seed 0): the "
        "evaluator's cost grows faster than the trials."
    )


def compute(trials: list, directions: list[str], params: list[str]) -> dict[str, float]:
    """fANOVA importances of ``params`` for the first objective, over ``trials`` (seed 0 of the forest)."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=directions)  # in memory: the evaluator reads trials only
    study.add_trials(trials)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning and friends
        return dict(
            optuna.importance.get_param_importances(
                study, evaluator=FanovaImportanceEvaluator(seed=0), params=params, target=lambda t: t.values[0]
            )
        )


class Importances:
    """A study's importances, being computed in a helper process; ``result()`` waits for them."""

    def __init__(self, optuna_study, max_trials: int = MAX_TRIALS) -> None:
        self._payload = inputs(optuna_study, max_trials)
        complete = sum(t.state.name == "COMPLETE" and bool(t.values) for t in optuna_study.get_trials(deepcopy=False))
        self.note = weighed_note(len(self._payload["trials"]), complete)  # "" unless a draw was weighed
        self._file: Optional[Path] = None
        self._helper: Optional[subprocess.Popen] = None
        try:
            self._start_helper()
        except OSError as err:  # no process to spare: computed in line by result()
            log.info("importances helper not started (%s); computing them in this process", err)
            self.close()

    def _start_helper(self) -> None:
        handle, name = tempfile.mkstemp(prefix="initstudy-importances-", suffix=".pkl")
        self._file = Path(name)
        with os.fdopen(handle, "wb") as out:
            pickle.dump(self._payload, out)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")]))}
        self._helper = subprocess.Popen(
            [sys.executable, "-m", HELPER_MODULE, str(self._file)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def result(self) -> dict[str, float]:
        """The importances: the helper's, or computed here if the helper could not run (logged).

        Raises ``EvaluatorError`` when Optuna's evaluator raised in the helper (e.g. a resumed
        study whose space changed): computing again here would raise the same."""
        try:
            found = self._helpers_result()
        finally:
            self.close()
        return found if found is not None else compute(**self._payload)

    def _helpers_result(self) -> Optional[dict[str, float]]:
        if self._helper is None:
            return None
        try:
            out, err = self._helper.communicate(timeout=HELPER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("the importances helper took over %.0f s; computing them in this process", HELPER_TIMEOUT_S)
            return None
        if self._helper.returncode != 0:
            log.warning(
                "the importances helper failed (exit %s): %s; computing them in this process",
                self._helper.returncode,
                err.decode(errors="replace").strip()[-500:],
            )
            return None
        outcome, value = pickle.loads(out)
        if outcome == "error":
            raise EvaluatorError(value)
        return value

    def close(self) -> None:
        """Stop the helper if it still runs and remove its payload (idempotent)."""
        if self._helper is not None and self._helper.poll() is None:
            self._helper.kill()
            self._helper.communicate()
        self._helper = None
        if self._file is not None:
            self._file.unlink(missing_ok=True)
            self._file = None


def _main(payload_file: str) -> None:
    payload = pickle.loads(Path(payload_file).read_bytes())
    try:
        outcome = ("ok", compute(**payload))
    except Exception as err:  # the evaluator's own refusal: the parent reports it, no retry
        outcome = ("error", f"{type(err).__name__}: {err}")
    sys.stdout.buffer.write(pickle.dumps(outcome))


if __name__ == "__main__":
    _main(sys.argv[1])
