#!/usr/bin/env bash
# Run named experiments (conf/experiment/<name>.yaml) and print each one's result table: per
# configuration of its grid, mean ± std over seeds (n) of the test accuracy, the validation accuracy,
# the diagnostics at init, epochs to target and divergences (docs/results.md is made of these).
#
#   scripts/run_experiments.sh                          # every experiment, one after another
#   scripts/run_experiments.sh edge_of_chaos pretrained # some of them
#   scripts/run_experiments.sh symmetry -- study.seeds=2 train.epochs=3   # overrides for every study
#   scripts/run_experiments.sh --table symmetry         # only print the table of a finished study
#
# Records go to $OUT (default runs/experiments): mlflow.db, artifacts/, studies/<name>/ (Optuna
# storage, report/). Re-running a finished study resumes it (nothing left to run) and reprints
# (pretrained re-runs its pretraining trial first; use --table to only reprint).
# `pretrained` takes two steps: a pretraining trial on MNIST-1D classes 0-4, then the fine-tuning
# study with that trial's run id (initializer=pretrained initializer.run_id=<run>).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/experiments}
TABLE_ONLY=0
NAMES=()
OVERRIDES=()
while (($#)); do
  case "$1" in
    --table) TABLE_ONLY=1 ;;
    --) shift; OVERRIDES=("$@"); break ;;
    *) NAMES+=("$1") ;;
  esac
  shift
done
if ((${#NAMES[@]} == 0)); then
  NAMES=(symmetry depth_vanishing_exploding activation_matching edge_of_chaos orthogonal_deep_linear
         normalization_softens batch_size_lr pretrained beyond_textbook trainable_depth width_transfer
         resnet_init)
fi

mkdir -p "$OUT"
STORE=("tracking.uri=sqlite:///$OUT/mlflow.db" "tracking.artifact_root=$OUT/artifacts")
STUDY=("study.output_dir=$OUT/studies")

# The pretraining step of `pretrained`: one trial, same model, classes 0-4, all training samples.
pretrain() {
  local log="$OUT/pretrained_source.log"
  "$PY" -m pipeline trial experiment=pretrained initializer=kaiming_normal 'dataset.classes=[0,1,2,3,4]' \
    dataset.max_train=null tracking.experiment=pretrained-source "${STORE[@]}" "${OVERRIDES[@]}" | tee "$log" >&2
  sed -n 's/^run_id=\([0-9a-f]*\).*/\1/p' "$log" | tail -n 1
}

run_one() {
  local name=$1 extra=()
  if [[ $name == pretrained ]]; then
    local run_id
    run_id=$(pretrain)
    echo "pretrained source run: $run_id" >&2
    extra=("initializer.run_id=$run_id")
  fi
  local cmd=("$PY" -m pipeline run "experiment=$name" "${STORE[@]}" "${STUDY[@]}" "${extra[@]}" "${OVERRIDES[@]}")
  echo "\$ ${cmd[*]}" >&2
  local start=$SECONDS
  "${cmd[@]}" >&2
  echo "wall time: $((SECONDS - start)) s (experiment $name)" >&2
}

table() {
  "$PY" - "$1" "sqlite:///$OUT/mlflow.db" <<'PYTHON'
"""One row per configuration of the study's grid: mean ± std over its seeds, and n."""
import math
import statistics
import sys

from pipeline.record.readback import study_runs

name, uri = sys.argv[1], sys.argv[2]
parent, children = study_runs(uri, name)
axes = [k[len("space."):] for k in parent.params if k.startswith("space.")]


def axis_value(run, key):
    return run.params.get(key, run.params.get(f"{key}.name", "?"))


def spread(values, digits=3):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    if any(math.isinf(v) or math.isnan(v) for v in values):
        return "inf/nan"
    return f"{mean:.{digits}g} ± {std:.2g}"


def order(key):
    """Grid order: numbers by value, names as the space lists them (choice(...) order)."""
    out = []
    for k, value in zip(axes, key):
        choices = [c.strip() for c in parent.params[f"space.{k}"].partition("(")[2].rstrip(")").split(",")]
        try:
            out.append((0, float(value), ""))
        except ValueError:
            out.append((1, choices.index(value) if value in choices else len(choices), value))
    return out


rows = {}
for run in children:
    rows.setdefault(tuple(axis_value(run, k) for k in axes), []).append(run)
rows = dict(sorted(rows.items(), key=lambda item: order(item[0])))

print(f"| {' | '.join(axes)} | n | test accuracy | val accuracy | init act std ratio | init grad norm ratio "
      f"| epochs to target (reached) | diverged |")
print("|" + "---|" * (len(axes) + 7))
for key, runs in rows.items():
    done = [r for r in runs if r.status == "FINISHED"]
    if not done:
        reason = runs[0].tags.get("failure_reason", "failed")[:80]
        print(f"| {' | '.join(key)} | 0 | failed: {reason} | | | | | |")
        continue
    m = lambda k: [r.metrics.get(k) for r in done]  # noqa: E731
    budget = int(float(done[0].params.get("train.epochs", 0)))
    reached = [r.metrics["epochs_to_target"] for r in done if "epochs_to_target" in r.metrics]
    to_target = [r.metrics.get("epochs_to_target", budget + 1) for r in done]  # as the objective counts it
    diverged = sum(r.tags.get("diverged") == "true" for r in done)
    print(f"| {' | '.join(key)} | {len(done)} | {spread(m('final_accuracy'))} | {spread(m('final_val_accuracy'))} "
          f"| {spread(m('init_act_std_ratio'), 2)} | {spread(m('init_grad_norm_ratio'), 2)} "
          f"| {spread(to_target, 2)} ({len(reached)}/{len(done)}) | {diverged}/{len(done)} |")
PYTHON
}

for name in "${NAMES[@]}"; do
  if ((!TABLE_ONLY)); then
    run_one "$name"
  fi
  echo
  echo "### $name (store $OUT/mlflow.db; report $OUT/studies/$name/report/report.html)"
  echo
  table "$name"
done
