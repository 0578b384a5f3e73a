"""Fixtures shared by the nn tests. (conf/ <-> registry contracts live in tests/test_conf.py.)"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread per test module.

    On a 2-CPU box MKL's QR (orthogonal_) right after an OpenMP-parallel op stalls ~0.3 s behind
    OpenMP's spinning threads (1 ms with one thread): the suite runs in half the time.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
