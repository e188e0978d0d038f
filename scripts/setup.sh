#!/usr/bin/env bash
# Create .venv and install the project. torch is pinned first so pip does not pull a newer build:
# on a CPU machine the pin resolves to the CPU wheel; on a GPU machine PyPI's default (CUDA) wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/python -c "import torch, onnxruntime; print(f'torch {torch.__version__}, onnxruntime {onnxruntime.__version__}')"
