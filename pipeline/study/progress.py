"""The study's progress bar: trials done/total, best so far, running, queued, failed."""

from __future__ import annotations

import sys

from optuna.trial import TrialState


class Progress:
    def __init__(self, done: int, total: int, enabled: bool = True) -> None:
        from tqdm import tqdm

        # Every trial redraws the bar (tqdm's default skips redraws within 0.1 s, and a skipped
        # redraw would hide what is running and queued until the next trial ends).
        self.bar = tqdm(
            total=total,
            initial=done,
            desc="trials",
            unit="trial",
            file=sys.stderr,
            disable=not enabled,
            dynamic_ncols=True,
            mininterval=0,
            miniters=1,
        )

    def update(self, study, running: int, queued: int = 0) -> None:
        """One more trial done; ``running``: trials training now, ``queued``: asked, waiting for a slot."""
        if self.bar.disable:  # no bar, no need to read every trial back from the store
            return
        trials = study.get_trials(deepcopy=False)
        failed = sum(t.state == TrialState.FAIL and not t.user_attrs.get("interrupted") for t in trials)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        postfix = {"running": running, "queued": queued, "failed": failed}
        if complete and len(study.directions) == 1:
            postfix["best"] = f"{study.best_value:.4f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
