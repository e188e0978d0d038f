"""scripts/setup.sh installs exactly one ONNX Runtime package, the one the machine's NVIDIA driver calls for."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def dry_run(tmp_path: Path, driver: bool, nvidia_smi: bool, override: str | None = None) -> list[str]:
    """The pip commands setup.sh would run on a machine with or without a driver (simulated)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if nvidia_smi:
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0)'\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    proc = tmp_path / "nvidia-version"
    if driver:
        proc.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.00\n")
    env = {**os.environ, "DRY_RUN": "1", "NVIDIA_PROC": str(proc), "PATH": f"{bin_dir}:/usr/bin:/bin"}
    env.pop("D2C_ORT", None)
    if override:
        env["D2C_ORT"] = override
    out = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def installed_and_removed(lines: list[str]) -> tuple[set[str], set[str]]:
    install = next(line for line in lines if " install " in line and "-e" in line)
    extras = install.split(".[", 1)[1].split("]", 1)[0].split(",")
    packages = {"cpu": "onnxruntime", "gpu": "onnxruntime-gpu"}
    removed = {line.split()[-1] for line in lines if " uninstall " in line}
    return {packages[e] for e in extras if e in packages}, removed


@pytest.mark.parametrize("driver,nvidia_smi,want", [
    (False, False, "onnxruntime"),
    (True, False, "onnxruntime-gpu"),
    (False, True, "onnxruntime-gpu"),
])
def test_exactly_one_onnx_runtime_is_installed(tmp_path, driver, nvidia_smi, want):
    installed, removed = installed_and_removed(dry_run(tmp_path, driver, nvidia_smi))
    assert installed == {want}
    assert removed == {"onnxruntime", "onnxruntime-gpu"} - {want}


def test_the_choice_can_be_overridden_and_is_checked(tmp_path):
    installed, _ = installed_and_removed(dry_run(tmp_path, driver=False, nvidia_smi=False, override="gpu"))
    assert installed == {"onnxruntime-gpu"}
    env = {**os.environ, "DRY_RUN": "1", "D2C_ORT": "rocm"}
    bad = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "D2C_ORT must be cpu or gpu" in bad.stderr


def test_both_packages_installed_is_one_clear_error(monkeypatch):
    from importlib import metadata

    from d2c_export.backends.ort import onnxruntime
    from d2c_export.errors import EngineError
    monkeypatch.setattr(metadata, "version", lambda dist: "1.32.0")  # as if onnxruntime and onnxruntime-gpu were both
    with pytest.raises(EngineError, match="both onnxruntime and onnxruntime-gpu are installed"):
        onnxruntime()
