"""Shared pytest fixtures: paths to the recorded official data, one torch thread for tiny-tensor modules."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL = FIXTURES / "official"


@pytest.fixture(scope="session")
def official_dir() -> Path:
    return OFFICIAL


@pytest.fixture()
def one_torch_thread():
    """Tiny tensors: intra-op threads only add contention. Modules opt in with `pytest.mark.usefixtures`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
