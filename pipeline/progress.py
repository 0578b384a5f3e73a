"""The study's progress bar: trials done/total, best so far, running, failed."""
from __future__ import annotations

import sys

from optuna.trial import TrialState


class Progress:
    def __init__(self, done: int, total: int, enabled: bool = True) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=done, desc="trials", unit="trial", file=sys.stderr,
                        disable=not enabled, dynamic_ncols=True)

    def update(self, study, running: int) -> None:
        if self.bar.disable:  # no bar, no need to read every trial back from the store
            return
        trials = study.get_trials(deepcopy=False)
        failed = sum(t.state == TrialState.FAIL for t in trials)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        postfix = {"running": running, "failed": failed}
        if complete and len(study.directions) == 1:
            postfix["best"] = f"{study.best_value:.4f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
