"""The engines the backend tests share: d2c-tiny (random weights) and the trained demo; the TensorRT and CUDA fakes."""
from __future__ import annotations

import shutil

import pytest

from d2c_export.engines import Engines
from tests.d2c_export.backends.fake_cuda import FakeCudaDevice
from tests.d2c_export.backends.fake_tensorrt import FakeTensorRT
from tests.d2c_export.backends.trt_fakes import plans


@pytest.fixture(scope="module")
def engines(engines_factory) -> Engines:
    return Engines.open(engines_factory("d2c-tiny"))


@pytest.fixture(scope="module")
def demo_engines(demo_export) -> Engines:
    """The trained demo (random weights sample latents past FP16's range): the session's export, read-only."""
    return Engines.open(demo_export)


@pytest.fixture()
def fake() -> tuple[FakeCudaDevice, FakeTensorRT]:
    """A fake CUDA device and the fake `tensorrt` module over it (TensorRT 10.x names)."""
    device = FakeCudaDevice()
    return device, FakeTensorRT(device)


@pytest.fixture()
def tiny(engines_factory, tmp_path, fake) -> Engines:
    """A private copy of the d2c-tiny engines with FP32 plans built on `fake`."""
    shutil.copytree(engines_factory("d2c-tiny"), tmp_path / "engines")
    return plans(tmp_path / "engines", fake)
