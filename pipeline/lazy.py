"""Public faces that import on first use.

A layer's ``__init__`` names its public face, but importing one module of a layer must not import
the rest: a study's driver imports ``pipeline.record.journal`` and must never import PyTorch
(which ``pipeline.record.runner`` does), and a worker imports the runner and must never import
MLflow. ``exports`` gives such a package a module ``__getattr__`` (PEP 562) that imports each
public name from its own module when it is first read. A public name must not be a submodule's
name: once the submodule is imported, Python binds that name to it on the package.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def exports(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """``__getattr__`` for ``package``: ``where`` maps each public name to the module defining it."""

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(where[name]), name)

    return __getattr__
