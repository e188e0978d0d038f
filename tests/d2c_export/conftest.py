"""Exported engines of the tiny presets, built once per test session; one local Ray instance for the session."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from d2c_export.export.onnx import export_model
from d2c_export.sources import ModelRequest, build_model
from d2c_export.stages import stages_for

TINY_CONFIGS = ("d2c-tiny", "d2c-tiny-cross_attn", "d2c-tiny-none")


# Presets exported without their optional stages (the token cache's two): the d2c-b export is the suite's largest,
# and its tests run the exact sampler; the engines of every other preset have every stage.
WITHOUT_OPTIONAL = ("d2c-b",)


def build_engines(name: str | None, out: Path, max_batch: int = 4, seed: int = 0) -> Path:
    """Export preset `name` with seeded random weights (None: the trained demo) into `out`, as `d2c-export onnx`."""
    model, source = build_model(ModelRequest(config=name, seed=seed))
    stages = "all"
    if name in WITHOUT_OPTIONAL:
        stages = [spec.name for spec in stages_for(model.config) if not spec.optional]
    export_model(model, out, source, stages=stages, max_batch=max_batch, progress=False)
    return out


@pytest.fixture(scope="session")
def engines_factory(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = build_engines(name, tmp_path_factory.mktemp(name.replace("-", "_")))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def demo_export(tmp_path_factory) -> Path:
    """The shipped demo checkpoint exported once per session (FP32 graphs, max batch 50: the quality test's 5 per
    class) for the tests that need trained weights (random weights sample past FP16's range). Read-only."""
    return build_engines(None, tmp_path_factory.mktemp("demo"), max_batch=50)


@pytest.fixture(scope="session")
def demo_fp16_engines(demo_export, tmp_path_factory) -> Path:
    """The session's demo export with FP16 graphs added (a copy), for the tests that need the trained weights at
    FP16. Read-only."""
    from d2c_export.engines import Engines
    from d2c_export.export.fp16 import convert_engines
    out = tmp_path_factory.mktemp("demo_fp16")
    shutil.copytree(demo_export, out, dirs_exist_ok=True)
    convert_engines(Engines.open(out), progress=False)
    return out


@pytest.fixture()
def tiny_engines_copy(engines_factory, tmp_path) -> Path:
    """A private copy of the d2c-tiny engines that a test may damage."""
    dst = tmp_path / "engines"
    shutil.copytree(engines_factory("d2c-tiny"), dst)
    return dst


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance (2 CPUs) that the serving and the bulk tests share, started on first use."""
    from d2c_export import ray_cluster
    ray_cluster.connect(None, num_cpus=2)
    try:
        yield
    finally:
        ray_cluster.shutdown()


@pytest.fixture(autouse=True)
def small_bench_roofline(monkeypatch):
    """The bench's matmul roofline at 256 x 256 in tests (2048 x 2048, twice per bench run, is about 10 s on 2 cores):
    a report needs a positive peak to set stages against, not an accurate one (its own test measures it small too)."""
    from functools import partial

    from d2c_export.bench import roofline, run
    monkeypatch.setattr(run, "matmul_roofline", partial(roofline.matmul_roofline, size=256, runs=2))


@pytest.fixture()
def without_tensorrt(monkeypatch) -> str:
    """TensorRT absent, as on a machine without it, here as well as where it is installed: the package is not found.
    Returns the reason the project then gives (`trt_platform.tensorrt_missing`)."""
    from d2c_export.trt_platform import tensorrt_missing
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args, **kwargs: None if name == "tensorrt" else find_spec(name, *args, **kwargs))
    return tensorrt_missing()
