"""The trial engine: data, models, initializers, optimizers, diagnostics, training (one trial or a
batch of same-shaped trials together), and weight files.

It knows nothing of Ray, Optuna or MLflow: ``run_trial(config, report)`` trains one configured model
and calls ``report(epoch, metrics)`` each epoch, which keeps it testable and usable on a GPU alone.
"""

from pipeline.lazy import exports

__all__ = ["PreparedTrial", "TrialResult", "prepare_trial", "run_trial", "train_batch", "train_trial"]
__getattr__ = exports(
    __name__,
    {
        "PreparedTrial": "pipeline.engine.train",
        "TrialResult": "pipeline.engine.train",
        "prepare_trial": "pipeline.engine.train",
        "run_trial": "pipeline.engine.train",
        "train_trial": "pipeline.engine.train",
        "train_batch": "pipeline.engine.batched",
    },
)
