#!/usr/bin/env bash
# The wheels scripts/gpu_check.sh carries to the GPU machine, whose image lacks them and has no network:
# onnxconverter-common, for the FP16 graphs of a trt-fp16 column where TensorRT is there (pure Python; what it needs,
# numpy, onnx, packaging and protobuf, is in the image). Run it here, where a package index answers; it writes into
# WHEELS (default .whl, ignored by git), which gpu_check.sh installs with --no-index --no-deps before its steps.
# Every other step of the check runs without these wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
PY=${PYTHON:-python3}
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d "$WHEELS" "onnxconverter-common==1.16.0"
ls -l "$WHEELS"
