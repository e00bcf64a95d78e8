"""Test-wide settings: offline, deterministic, small thread pool."""

from __future__ import annotations

import os
from collections.abc import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run a test on one torch thread; a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.

    Tiny models gain nothing from a second thread, and on a shared machine the spinning OpenMP threads of a
    2-thread pool fight other processes for the cores. The pipeline/check/config/CLI test files took 436 s with
    the 2 threads set above, 147 s with this fixture, and 84 s with OMP_WAIT_POLICY=PASSIVE set before torch is
    imported, each under a load average of about 8-9 on the shared 2-core machine.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
