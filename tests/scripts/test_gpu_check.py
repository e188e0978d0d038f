"""scripts/gpu_check.sh on the CPU: one clear line without a CUDA device, and every step it runs on the GPU machine
runs here too, with the modules that machine's image lacks hidden (`lent_image.py`), the CUDA check answered yes by
a stand-in interpreter and the sizes turned down."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.scripts.lent_image import missing_modules, write_blocker

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
# what the image is known to lack that the project imports; the blocker is built from the package list
KNOWN_MISSING = {"onnxconverter_common", "ray", "fastapi", "starlette", "pydantic", "tensorrt"}
# the sizes turned down (the bench on the smallest preset, without the GPT and cond stages that the parity tables'
# d2c-tiny export covers), and the time limits up for 2 shared cores
TINY = {"INSTALL": "0", "BENCH_CONFIG": "d2c-tiny-none", "BENCH_BATCHES": "1,2", "BENCH_STEPS": "1 1",
        "LIMIT_PERCENT": "1000", "BUDGET_S": "6000"}
OUT_FILES = {"summary.md", "check.log", "gpu_tests.txt", "parity.txt", "bench-b1.json", "bench-b2.json"}


def run(args: list[str], env: dict | None = None, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def lent_image_env(tmp_path: Path, hang_on: str | None = None) -> dict:
    """The environment of a run as on the GPU machine: its missing modules hidden, no wheels to carry, and a
    stand-in interpreter that answers the CUDA check yes (the rest sees no GPU: the gpu tests skip, PyTorch
    computes on the CPU); with `hang_on`, a call whose arguments hold that text hangs instead."""
    python = tmp_path / "python"
    hang = f'  *"{hang_on}"*) exec sleep 600 ;;\n' if hang_on else ""
    python.write_text(f"""#!/bin/sh
case "$*" in
  *is_available*) exit 0 ;;
  *get_device_name*) echo "torch (stand-in), no GPU"; exit 0 ;;
{hang}esac
exec {sys.executable} "$@"
""")
    python.chmod(0o755)
    blocker = write_blocker(tmp_path / "lent-image")
    return {"PYTHON": str(python), "PYTHONPATH": f"{blocker}{os.pathsep}{ROOT}", "WHEELS": str(tmp_path / "no-wheels"),
            **TINY}


def table_rows(text: str, first: str, keys: int = 1) -> dict[str, list[str]]:
    """The rows of the Markdown table whose header starts with `first`, keyed by their first `keys` cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first} |"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[" ".join(cells[:keys])] = cells
    return rows


def test_without_cuda_it_says_so_in_one_line(tmp_path):
    out = run([str(tmp_path / "out")])
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"gpu_check: no CUDA device (torch.cuda.is_available() is False for {sys.executable}); "
        "run it on a machine with an NVIDIA GPU"]
    assert not (tmp_path / "out").exists()
    usage = run([])
    assert usage.returncode == 2 and usage.stderr.strip() == "usage: bash scripts/gpu_check.sh OUTDIR"


def test_the_blocker_hides_what_the_lent_image_lacks(tmp_path):
    missing = missing_modules()
    assert KNOWN_MISSING <= set(missing) and not {"torch", "onnx", "onnxruntime", "PIL", "click"} & set(missing)
    blocker = write_blocker(tmp_path / "lent-image")
    probe = ("import importlib.util, importlib.metadata as md\n"
             "for name in ('ray', 'onnxconverter_common', 'tensorrt', 'fastapi'):\n"
             "    assert importlib.util.find_spec(name) is None, name\n"
             "try:\n    from ray import serve\nexcept ModuleNotFoundError as e:\n    print(e)\n"
             "try:\n    md.version('onnxconverter-common')\nexcept md.PackageNotFoundError:\n    print('no metadata')\n"
             "assert importlib.util.find_spec('torch') and md.version('onnx')\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{ROOT}"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["No module named 'ray'", "no metadata"]


@pytest.mark.slow
def test_every_step_runs_on_the_lent_image(tmp_path):
    out = run([str(tmp_path / "out")], env=lent_image_env(tmp_path), timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = tmp_path / "out"
    assert {p.name for p in results.iterdir()} == OUT_FILES
    summary = (results / "summary.md").read_text()
    assert out.stdout.endswith(summary)  # the table closes stdout
    steps = table_rows(summary, "step")
    assert {s: cells[1] for s, cells in steps.items() if not cells[1].startswith("ok")} == {
        "install": "skipped: INSTALL=0", "trt-fp16 plans": "skipped: no TensorRT"}, steps
    tests = (results / "gpu_tests.txt").read_text()
    last = tests.strip().splitlines()[-1]  # every gpu test collected, and skipped here for want of CUDA
    assert re.search(r"\d+ skipped, \d+ deselected", last) and not re.search("error|failed|passed", last), last
    assert "test_cuda.py" in tests and "needs a CUDA device" in tests
    assert "0 errors" in steps["gpu tests"][1]
    parity = (results / "parity.txt").read_text()
    assert parity.count(", 0 failed") == 3 and "torch-bf16" in parity and "torch-fp16" in parity
    figures = table_rows(summary, "batch", keys=2)
    assert set(figures) == {f"{b} {n}" for b in (1, 2) for n in ("torch", "torch-bf16")}
    for cells in figures.values():
        assert float(cells[-2]) > 0 and float(cells[-1]) > 0  # s/image, images/s


@pytest.mark.slow
def test_a_step_that_hangs_is_cut_and_the_rest_runs(tmp_path):
    """Limits at 3 % of the GPU machine's: the hung tests are cut at 3 s, the later steps each run (and are cut where
    their work needs more), the summary still closes the output, and the whole run stays inside the budget."""
    env = {**lent_image_env(tmp_path, hang_on="-m pytest"), "LIMIT_PERCENT": "3", "BUDGET_S": "60"}
    out = run([str(tmp_path / "out")], env=env, timeout=120)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    steps = table_rows((tmp_path / "out" / "summary.md").read_text(), "step")
    assert steps["gpu tests"][1].startswith("timed out (limit 3 s)") and int(steps["gpu tests"][2]) < 15
    assert "parity tables" in steps and "export d2c-tiny-none" in steps
    assert sum(int(cells[2]) for cells in steps.values()) < 60
    assert out.stdout.rstrip().endswith((tmp_path / "out" / "summary.md").read_text().rstrip())
