"""Shared pytest fixtures: paths to the recorded official data."""
from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL = FIXTURES / "official"


@pytest.fixture(scope="session")
def official_dir() -> Path:
    return OFFICIAL
