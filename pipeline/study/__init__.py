"""The study layer: a study planned (config, space, sampler, pruner, storage), its trials asked of
Optuna, grouped and dispatched to Ray workers, and their outcomes told back and recorded.

The driver imports this layer and never PyTorch; the worker (``worker.trial_task``) trains through
the record layer's runner. Ray is touched only in ``cluster``.
"""

from pipeline.lazy import exports

__all__ = ["StudyDone", "StudyFailed", "run_study"]
__getattr__ = exports(
    __name__,
    {"StudyDone": "pipeline.study.loop", "StudyFailed": "pipeline.study.loop", "run_study": "pipeline.study.loop"},
)
