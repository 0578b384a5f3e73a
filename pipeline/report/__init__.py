"""The report layer: a study read back from its record (MLflow runs and Optuna storage) and drawn
as figures and one HTML page, built by the commands once a study is over.

It reads the record and the study's summary and storage helpers, never the dispatch loop.
"""

from pipeline.lazy import exports

__all__ = ["build_report"]
__getattr__ = exports(__name__, {"build_report": "pipeline.report.build"})
