#!/usr/bin/env bash
# The GPU checks of the PyTorch fast path, for a bare machine with a CUDA GPU and PyTorch but no TensorRT, no
# network and CPU-only onnxruntime: the gpu-marked tests, the parity of the CUDA paths (FP32, FP16, BF16)
# against the CPU reference, and d2c-bench on d2c-b (64 masked and 100 diffusion steps, batch 1 and 16) for
# PyTorch eager FP32 on CUDA against the fast path (BF16 weights, static KV cache, CUDA graphs). The bench's
# d2c-b has random weights, whose untrained head samples latents beyond FP16's range (about 1e4 and more):
# BF16 has FP32's range and FP16's speed on Hopper; FP16 is held to the reference on the trained demo (tests).
# Usage: bash scripts/gpu_check.sh OUTDIR  (writes gpu_tests.txt, parity.txt, bench/bench.{json,md} there)
# It installs nothing from an index: the project with `pip install --no-deps --no-build-isolation -e .`, and the
# wheels in WHEELS (default .whl, if present) into /tmp/site. PYTHON picks the interpreter (default python3);
# INSTALL=0 skips the install, BENCH_CONFIG / BENCH_BATCHES / BENCH_STEPS ("NUM_ITER DIFFUSION_STEPS") size the bench.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-}
if [ -z "$OUT" ]; then echo "usage: bash scripts/gpu_check.sh OUTDIR" >&2; exit 2; fi
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device (torch.cuda.is_available() is False for $PY); run it on a machine with an NVIDIA GPU" >&2
  exit 2
fi
mkdir -p "$OUT"
WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
[ "${INSTALL:-1}" = 0 ] || "$PY" -m pip install -q --no-deps --no-build-isolation -e .
read -r NUM_ITER DIFFUSION_STEPS <<<"${BENCH_STEPS:-64 100}"
export PYTHONUNBUFFERED=1
d2c() {  # d2c SECONDS MAIN ARGS...: a command of d2c_export.cli under a time limit (console scripts may be off PATH)
  local limit=$1 main=$2; shift 2
  timeout "$limit" "$PY" -c "import sys; from d2c_export.cli import $main; sys.exit($main(sys.argv[1:]))" "$@"
}
"$PY" -c "import torch; print(f'torch {torch.__version__}, {torch.cuda.get_device_name(0)}')" | tee "$OUT/device.txt"
status=0
# 1. the gpu-marked tests (parity against the CPU reference, graph replays, host syncs per masked step); the
#    serving and bulk tests need Ray, which the GPU image lacks
timeout 240 "$PY" -m pytest -p no:cacheprovider -rs -m gpu tests/ --ignore=tests/d2c_export/serve --ignore=tests/d2c_export/bulk 2>&1 | tee "$OUT/gpu_tests.txt" || status=1
# 2. the parity tables of the CUDA paths against the CPU reference, on random d2c-tiny weights
ENG=$(mktemp -d)/engines
d2c 120 export_main onnx --config d2c-tiny --out "$ENG" --max-batch 4 --quiet
: >"$OUT/parity.txt"
for p in fp32 fp16 bf16; do
  d2c 60 export_main check --engines "$ENG" --backend torch --precision "$p" \
    2>&1 | tee -a "$OUT/parity.txt" || status=1
done
# 3. latency: eager FP32 on CUDA against the fast path, d2c-b at ImageNet's settings
d2c 420 bench_main --config "${BENCH_CONFIG:-d2c-b}" --backends torch,torch-bf16 --batch "${BENCH_BATCHES:-1,16}" \
  --num-iter "$NUM_ITER" --diffusion-steps "$DIFFUSION_STEPS" --repeat 2 --warmup 1 --no-plot --out "$OUT/bench" 2>&1 \
  | tee "$OUT/bench.log" || status=1
exit $status
