"""The record layer: everything MLflow.

The store and its URIs, runs that always end, the journals a study's workers record into, the
names of every tag, param and artifact (``names``), reading studies back, and the recorded-trial
runner that ``trial``, ``reproduce`` and the study's workers share. It sits on the engine and the
config and imports neither the study nor the report layer. MLflow itself is imported only inside
the functions that talk to a store, so that a worker, which records into journals, never loads it.
"""

from pipeline.lazy import exports

__all__ = ["RecordedTrial", "TrialRequest", "run_recorded_batch", "run_recorded_trial"]
__getattr__ = exports(
    __name__,
    {
        "RecordedTrial": "pipeline.record.runner",
        "TrialRequest": "pipeline.record.runner",
        "run_recorded_batch": "pipeline.record.runner",
        "run_recorded_trial": "pipeline.record.runner",
    },
)
