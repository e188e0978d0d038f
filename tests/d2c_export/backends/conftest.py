"""The engines the PyTorch-backend tests share: d2c-tiny (random weights) and the trained demo."""
from __future__ import annotations

import pytest

from d2c_export.engines import Engines
from tests.d2c_export.conftest import build_engines


@pytest.fixture(scope="module")
def engines(engines_factory) -> Engines:
    return Engines.open(engines_factory("d2c-tiny"))


@pytest.fixture(scope="module")
def demo_engines(tmp_path_factory) -> Engines:
    """The trained demo (random weights sample latents past FP16's range), max batch 16."""
    return Engines.open(build_engines(None, tmp_path_factory.mktemp("demo"), max_batch=16))
