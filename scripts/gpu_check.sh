#!/usr/bin/env bash
# The GPU checks in one run, for a bare machine with a CUDA GPU and PyTorch (no network, CPU-only onnxruntime,
# TensorRT optional): the gpu-marked tests, the parity tables of the CUDA paths (FP32, FP16, BF16) against the CPU
# reference, then d2c-bench on d2c-b (64 masked and 100 diffusion steps, batch 1 and 16) for PyTorch eager FP32 on
# CUDA, the fast path (BF16 weights, static KV cache, CUDA graphs) and, where TensorRT and onnxconverter-common
# (a carried wheel) are there, trt-fp16. The bench's d2c-b has random weights, whose untrained head samples latents
# beyond FP16's range: BF16 has FP32's range and FP16's speed on Hopper; FP16 is held to the reference on the demo.
#
# Usage: bash scripts/gpu_check.sh OUTDIR
# Each step runs under its own time limit (LIMIT_PERCENT, default 100, scales them for slower machines) and all of
# them within BUDGET_S seconds (default 570, one 10-minute call); a step that fails or runs out of time is recorded
# and the next one runs; the bench's batches share what the other steps left. The run ends with one summary
# table (each step's result, then s/image and images/s per batch and column), printed last and written to
# OUTDIR/summary.md. OUTDIR also gets check.log (device, installs, exports, the bench's logs), gpu_tests.txt,
# parity.txt and bench-b<B>.json per batch; engines stay in a temporary folder, removed at the end.
# Exit status: 0 when every step that ran passed, 1 otherwise, 2 for no CUDA device or no OUTDIR.
# It installs nothing from an index: the wheels in WHEELS (default .whl, if any; scripts/fetch_wheels.sh) with
# --no-index --no-deps into SITE (default /tmp/site), and the project with `pip install --no-deps
# --no-build-isolation -e .` (INSTALL=0 skips it). PYTHON picks the interpreter (default python3); BENCH_CONFIG,
# BENCH_BATCHES and BENCH_STEPS ("NUM_ITER DIFFUSION_STEPS") size the bench.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-}
if [ -z "$OUT" ]; then echo "usage: bash scripts/gpu_check.sh OUTDIR" >&2; exit 2; fi
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device (torch.cuda.is_available() is False for $PY); run it on a machine with an NVIDIA GPU" >&2
  exit 2
fi
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
START=$SECONDS
BUDGET_S=${BUDGET_S:-570}
LIMIT_PERCENT=${LIMIT_PERCENT:-100}
BENCH_CONFIG=${BENCH_CONFIG:-d2c-b}
BENCH_BATCHES=${BENCH_BATCHES:-1,16}
read -r NUM_ITER DIFFUSION_STEPS <<<"${BENCH_STEPS:-64 100}"
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
LOG=$OUT/check.log
STEPS=$SCRATCH/steps.tsv
: >"$LOG"
: >"$STEPS"
export PYTHONUNBUFFERED=1
D2C_CODE="import sys; from d2c_export import cli; sys.exit(getattr(cli, sys.argv[1])(sys.argv[2:]))"
D2C=("$PY" -c "$D2C_CODE")  # D2C export_main ARGS...: a command's main (console scripts may be off PATH)

record() {  # record NAME RESULT SECONDS
  printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$STEPS"
  echo "gpu_check: [$((SECONDS - START)) s] $1: $2 ($3 s)"
}

step() {  # step NAME CAP LOGFILE CMD...: CMD, its output appended to LOGFILE, under min(CAP, what the budget has left)
  local name=$1 cap=$(($2 * LIMIT_PERCENT / 100)) log=$3 left limit t0 rc result
  shift 3
  left=$((BUDGET_S - (SECONDS - START) - 5))
  limit=$((cap < left ? cap : left))
  if ((limit < 2)); then
    record "$name" "not run: the budget of $BUDGET_S s is spent" 0
    return 1
  fi
  echo "== $name (limit $limit s): $*" >>"$log"
  t0=$SECONDS
  timeout -k 5 "$limit" "$@" >>"$log" 2>&1 </dev/null
  rc=$?
  case $rc in
    0) result=ok ;;
    124 | 137) result="timed out (limit $limit s)" ;;
    *) result="failed (exit $rc)" ;;
  esac
  record "$name" "$result" $((SECONDS - t0))
  if ((rc != 0)); then echo "-- the last lines of $log:"; tail -n 15 "$log"; fi
  return $rc
}

parity_tables() {  # the d2c-tiny engines, then the parity table of each PyTorch precision on CUDA
  "$PY" -c "$D2C_CODE" export_main onnx --config d2c-tiny --out "$SCRATCH/tiny" --max-batch 4 --quiet || return
  local p rc=0
  for p in fp32 fp16 bf16; do
    "$PY" -c "$D2C_CODE" export_main check --engines "$SCRATCH/tiny" --backend torch --precision "$p" || rc=1
  done
  return $rc
}

"$PY" -c "import torch; print(f'{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}')" \
  >"$SCRATCH/device.txt" 2>>"$LOG" || echo "unknown device" >"$SCRATCH/device.txt"
echo "gpu_check: $(cat "$SCRATCH/device.txt"); budget $BUDGET_S s; output in $OUT" | tee -a "$LOG"

# 0. installs: carried wheels (onnxconverter-common, say), then the project itself
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  step "wheels" 45 "$LOG" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
if [ "${INSTALL:-1}" = 0 ]; then
  record "install" "skipped: INSTALL=0" 0
else
  step "install" 60 "$LOG" "$PY" -m pip install -q --no-deps --no-build-isolation -e .
fi
# 1. the gpu-marked tests (parity against the CPU reference, graph replays, host syncs per masked step); the
#    serving and bulk tests need Ray, which the GPU image lacks
step "gpu tests" 110 "$OUT/gpu_tests.txt" "$PY" -m pytest -p no:cacheprovider -rs -m gpu tests/ \
  --ignore=tests/d2c_export/serve --ignore=tests/d2c_export/bulk
# 2. the parity tables of the CUDA paths against the CPU reference, on random d2c-tiny weights
export -f parity_tables
export PY D2C_CODE SCRATCH
step "parity tables" 75 "$OUT/parity.txt" bash -c parity_tables
# 3. the bench's engines: the FP32 graphs, then (under their own limit, so the PyTorch columns run whatever happens
#    to them) the FP16 graphs and trt-fp16 plans where TensorRT and onnxconverter-common are there
COLUMNS=torch,torch-bf16
ENG=$SCRATCH/$BENCH_CONFIG
TRT_WHY=
"$PY" -c "import tensorrt" 2>/dev/null || TRT_WHY="no TensorRT"
[ -n "$TRT_WHY" ] || "$PY" -c "import onnxconverter_common" 2>/dev/null \
  || TRT_WHY="no onnxconverter-common (bash scripts/fetch_wheels.sh, then carry .whl)"
MAX_BATCH=$(tr ',' '\n' <<<"$BENCH_BATCHES" | sort -n | tail -n 1)
if step "export $BENCH_CONFIG" 170 "$LOG" "${D2C[@]}" export_main onnx --config "$BENCH_CONFIG" --out "$ENG" \
  --max-batch "$MAX_BATCH" --quiet; then
  if [ -n "$TRT_WHY" ]; then
    record "trt-fp16 plans" "skipped: $TRT_WHY" 0
  elif step "trt-fp16 plans" 240 "$LOG" "${D2C[@]}" export_main trt --fp16 --engines "$ENG" --quiet; then
    COLUMNS=$COLUMNS,trt-fp16
  fi
  # 4. latency, one bench per batch (a batch that runs out of time keeps the others' figures), sharing what is left
  BATCHES=(${BENCH_BATCHES//,/ })
  for i in "${!BATCHES[@]}"; do
    b=${BATCHES[$i]}
    share=$(((BUDGET_S - (SECONDS - START) - 5) / (${#BATCHES[@]} - i) * 100 / LIMIT_PERCENT))  # not scaled
    step "bench batch $b" "$share" "$LOG" "${D2C[@]}" bench_main --engines "$ENG" --backends "$COLUMNS" --batch "$b" \
      --num-iter "$NUM_ITER" --diffusion-steps "$DIFFUSION_STEPS" --repeat 2 --warmup 1 --no-plot \
      --out "$SCRATCH/bench-b$b"
    [ -f "$SCRATCH/bench-b$b/bench.json" ] && cp "$SCRATCH/bench-b$b/bench.json" "$OUT/bench-b$b.json"
  done
else
  record "bench" "not run: no $BENCH_CONFIG engines" 0
fi
"$PY" scripts/gpu_check_summary.py "$STEPS" "$OUT" "$(cat "$SCRATCH/device.txt")" $((SECONDS - START)) \
  >"$OUT/summary.md" 2>>"$LOG" || echo "gpu_check: the summary failed; see $LOG" >>"$OUT/summary.md"
echo
cat "$OUT/summary.md"
awk -F '\t' '$2 !~ /^(ok|skipped)/ { failed = 1 } END { exit failed }' "$STEPS"
