"""scripts/gpu_check.sh on the CPU: one clear line without a CUDA device, and every step it runs on a GPU machine
runs here too, with the CUDA check answered yes by a stand-in interpreter and the bench sized down."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def run(args: list[str], env: dict | None = None, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def test_without_cuda_it_says_so_in_one_line(tmp_path):
    out = run([str(tmp_path / "out")])
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"gpu_check: no CUDA device (torch.cuda.is_available() is False for {sys.executable}); "
        "run it on a machine with an NVIDIA GPU"]
    assert not (tmp_path / "out").exists()
    usage = run([])
    assert usage.returncode == 2 and usage.stderr.strip() == "usage: bash scripts/gpu_check.sh OUTDIR"


@pytest.mark.slow
def test_every_step_runs(tmp_path):
    """The CUDA check answered yes (the rest sees no GPU: the gpu tests skip, PyTorch computes on the CPU)."""
    python = tmp_path / "python"
    python.write_text(f"""#!/bin/sh
case "$*" in
  *is_available*) exit 0 ;;
  *get_device_name*) echo "torch (stand-in), no GPU"; exit 0 ;;
esac
exec {sys.executable} "$@"
""")
    python.chmod(0o755)
    out = run([str(tmp_path / "out")], timeout=300,
              env={"PYTHON": str(python), "INSTALL": "0", "BENCH_CONFIG": "d2c-tiny", "BENCH_BATCHES": "1",
                   "BENCH_STEPS": "2 2"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = tmp_path / "out"
    assert "skipped" in (results / "gpu_tests.txt").read_text()  # collected and skipped: no CUDA here
    parity = (results / "parity.txt").read_text()
    assert parity.count(", 0 failed") == 3 and "torch-bf16" in parity and "torch-fp16" in parity
    assert {p.name for p in (results / "bench").iterdir()} >= {"bench.json", "bench.md"}
    assert "torch-bf16" in (results / "bench" / "bench.md").read_text()
