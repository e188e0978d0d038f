"""Exported engines of the tiny presets, built once per test session."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from d2c_export.onnx_export import export_model
from reference.model import D2C, get_config

TINY_CONFIGS = ("d2c-tiny", "d2c-tiny-cross_attn", "d2c-tiny-none")


def build_engines(name: str, out: Path, max_batch: int = 4, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = D2C(get_config(name)).eval()
    export_model(model, out, {"random_init_seed": seed}, max_batch=max_batch, progress=False)
    return out


@pytest.fixture(scope="session")
def engines_factory(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = build_engines(name, tmp_path_factory.mktemp(name.replace("-", "_")))
        return cache[name]

    return get


@pytest.fixture()
def tiny_engines_copy(engines_factory, tmp_path) -> Path:
    """A private copy of the d2c-tiny engines that a test may damage."""
    dst = tmp_path / "engines"
    shutil.copytree(engines_factory("d2c-tiny"), dst)
    return dst
