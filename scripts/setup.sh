#!/usr/bin/env bash
# Create .venv and install the project with exactly one ONNX Runtime package, chosen by the machine:
# `onnxruntime-gpu` (extra `gpu`) where an NVIDIA driver is present, else `onnxruntime` (extra `cpu`); the
# other one is removed first, since the two share one module and the CUDA provider disappears when both are
# installed. D2C_ORT=cpu|gpu overrides the choice. torch is pinned first so pip does not pull a newer build: on
# a CPU machine the pin resolves to the CPU wheel, on a GPU machine to PyPI's default (CUDA) wheel.
# DRY_RUN=1 prints the pip commands instead of running them (the tests check the choice that way).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
NVIDIA_PROC=${NVIDIA_PROC:-/proc/driver/nvidia/version}

nvidia_driver() {
  [ -e "$NVIDIA_PROC" ] || { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
}

ORT=${D2C_ORT:-}
if [ -z "$ORT" ]; then
  if nvidia_driver; then ORT=gpu; else ORT=cpu; fi
fi
case "$ORT" in
  gpu) KEEP=onnxruntime-gpu DROP=onnxruntime ;;
  cpu) KEEP=onnxruntime DROP=onnxruntime-gpu ;;
  *) echo "error: D2C_ORT must be cpu or gpu, got '$ORT'" >&2; exit 2 ;;
esac

run() { if [ "${DRY_RUN:-0}" = 1 ]; then echo "$*"; else "$@"; fi; }

[ "${DRY_RUN:-0}" = 1 ] || [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip)
run "${PIP[@]}" install --quiet --upgrade pip
if [ "${DRY_RUN:-0}" = 1 ] || ! .venv/bin/python -c "import torch" 2>/dev/null; then
  run "${PIP[@]}" install --quiet "torch==2.13.0"
fi
if [ "${DRY_RUN:-0}" = 1 ] || .venv/bin/python -m pip show --quiet "$DROP" >/dev/null 2>&1; then
  run "${PIP[@]}" uninstall --quiet --yes "$DROP"
fi
run "${PIP[@]}" install --quiet -e ".[dev,serve,$ORT]"
[ "${DRY_RUN:-0}" = 1 ] || .venv/bin/python -c "import torch, onnxruntime; print(f'torch {torch.__version__}, onnxruntime {onnxruntime.__version__} ($KEEP)')"
