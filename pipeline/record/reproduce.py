"""``reproduce RUN_ID``: re-run a recorded trial from its logged config and compare the two.

The new run goes to the original's experiment with a ``reproduced_from`` tag. The comparison
covers every curve both runs logged and the final metrics. On CPU the same config gives the same
numbers, so every difference should be 0; on a GPU nondeterministic kernels make small
differences, which are reported, not hidden. A run that trained in a batch of trials (tags
``trial_batch``, ``trial_batch_id``) re-runs in the same batch: alone, its matmuls would round
differently, and training grows that (a chaotic trial can end elsewhere entirely).
"""

from __future__ import annotations

from pipeline.record import names
from pipeline.record.artifacts import download_config
from pipeline.record.readback import batch_mates, metric_histories
from pipeline.record.runner import RecordedTrial, run_recorded_in_batch, run_recorded_trial
from pipeline.record.store import experiment_of

CURVES = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")
FINALS = ("final_accuracy", "final_val_accuracy", "best_val_accuracy")


def reproduce(run_id: str, uri: str) -> tuple[RecordedTrial, str]:
    """Re-run ``run_id`` from the store at ``uri``; return the new trial and a printable comparison.

    A run that trained in a batch of trials is re-run in that batch (its batch-mates' logged
    configs, in the batch's order; only it is recorded again), so that the same arithmetic
    rounds the same way.
    """
    config = _logged_config(run_id, uri)  # first: an unknown run is a one-line error
    mates = batch_mates(uri, run_id)
    configs = [config if mate == run_id else _logged_config(mate, uri) for mate in mates]
    experiment = experiment_of(uri, run_id)
    tags = {names.REPRODUCED_FROM_TAG: run_id}
    if len(mates) > 1:
        done = run_recorded_in_batch(configs, mates.index(run_id), experiment, tags)
    else:
        done = run_recorded_trial(configs[0], experiment=experiment, tags=tags)
    original = metric_histories(uri, run_id, CURVES + FINALS)
    return done, compare(original, done, run_id)


def _logged_config(run_id: str, uri: str) -> dict:
    config = download_config(run_id, uri)
    config["tracking"]["uri"] = uri
    return config


def compare(original: dict[str, list[tuple[int, float]]], done: RecordedTrial, run_id: str) -> str:
    """A table: per curve the largest |difference| over epochs, then the final metrics side by side."""
    lines = [
        f"reproduction of {run_id} as {done.run_id}:",
        "",
        "| metric | original | reproduced | max abs diff |",
        "|---|---|---|---|",
    ]
    history = {row["epoch"]: row for row in done.result.history}
    for key in CURVES:
        points = original.get(key, [])
        diffs = [abs(value - history[step][key]) for step, value in points if key in history.get(step, {})]
        if points:
            lines.append(
                f"| {key} (curve, {len(points)} points) | {points[-1][1]:.6f} | {history[points[-1][0]].get(key, float('nan')):.6f} | {max(diffs, default=float('nan')):.3g} |"
            )
    summary = done.result.summary()
    for key in FINALS:
        if key in original:
            old = original[key][-1][1]
            lines.append(f"| {key} | {old:.6f} | {summary[key]:.6f} | {abs(old - summary[key]):.3g} |")
    return "\n".join(lines)
