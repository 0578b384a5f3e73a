"""Every name the MLflow record uses, spelled once: tags, params, artifacts (docs/record.md).

The record is a contract: the MLflow UI, ``reproduce``, the study report and users' own queries
read these names, so they change only together with docs/record.md.
"""

from __future__ import annotations

# --- experiments ------------------------------------------------------------------------------------
#: MLflow's UI opens an experiment in the view this tag names: the model-training view (runs table,
#: charts) rather than the GenAI view (traces) it shows by default.
EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"

# --- tags -------------------------------------------------------------------------------------------
ROLE_TAG = "initstudy.role"  # "study" on a study's parent run, "trial" on each trial run
STUDY_ROLE, TRIAL_ROLE = "study", "trial"
STUDY_TAG = "initstudy.study"  # the study's name, on its parent and trial runs
OPTUNA_TRIAL_TAG = "optuna_trial"
OPTUNA_STATE_TAG = "optuna_state"  # RUNNING, then COMPLETE | PRUNED | FAIL
SEED_TAG, SEED_INDEX_TAG = "seed", "seed_index"
DIVERGED_TAG, DIVERGED_EPOCH_TAG, PRUNED_TAG = "diverged", "diverged_epoch", "pruned"
FAILURE_REASON_TAG = "failure_reason"
REPRODUCE_TAG = "reproduce"  # the command that re-runs a trial
REPRODUCED_FROM_TAG = "reproduced_from"
DEVICE_TAG = "device"
#: A batch member's tags: how many trained together, which batch (one id per Ray task's batch) and
#: its place in it, which is what replays it exactly.
BATCH_SIZE_TAG, BATCH_ID_TAG, BATCH_INDEX_TAG = "trial_batch", "trial_batch_id", "trial_batch_index"
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own: nests trial runs under the study's run
RAY_NODE_TAG, RAY_NODE_IP_TAG, PID_TAG = "ray_node", "ray_node_ip", "pid"  # where a study's trial ran

# --- a study's parent run ----------------------------------------------------------------------------
COMMAND_TAG = "command"  # the command that ran (or resumed) the study
N_TRIALS_TARGET_TAG = "n_trials_target"
REFERENCE_SCALES_TAG = "reference_scales"
BEST_TRIAL_TAG, BEST_PARAMS_TAG = "best_trial", "best_params"
REPORT_ERROR_TAG = "report_error"
N_COMPLETE_METRIC, N_PRUNED_METRIC, N_FAILED_METRIC = "n_complete", "n_pruned", "n_failed"
STORAGE_PARAM = "storage"  # the Optuna storage of the study
OBJECTIVES_PARAM = "study.objectives"
STUDY_CONFIG_ARTIFACT = "study_config.yaml"
SUMMARY_ARTIFACT, TRIALS_ARTIFACT = "summary.md", "trials.csv"
REPORT_DIR = "report"

# --- a trial's artifacts -----------------------------------------------------------------------------
CONFIG_ARTIFACT = "config.yaml"  # the resolved config: what reproduce re-runs
WEIGHTS_ARTIFACT = "weights/model.safetensors"  # the final weights: what initializer=pretrained reads
LAYERS_ARTIFACT = "diagnostics/layers.csv"  # per-layer diagnostics, one row per layer and probed epoch
LAYER_PLOT_ARTIFACT = "diagnostics/signal_by_depth.png"


def optuna_state_of(pruned: bool) -> str:
    """The Optuna state a study trial's own result implies, tagged as its run ends (in the same
    store write): the driver writes the tag again only where the trial's other seeds made it
    differ (a seed failed: FAIL; another seed pruned: PRUNED)."""
    return "PRUNED" if pruned else "COMPLETE"
