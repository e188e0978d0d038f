#!/usr/bin/env bash
# The main job end to end: set up, export every stage, check parity, generate an image.
# By default it exports the trained demo checkpoint (checkpoints/d2c-demo.safetensors, 16 px shapes) and holds
# ONNX Runtime to the reference's sample quality (d2c-quality). The sampling settings are the ones the engines
# record for their model (the demo's: cfg 1.0, 16 masked steps, 500 denoising steps).
# CONFIG=d2c-b bash scripts/demo.sh runs the full-size architecture (random weights, a few minutes on a CPU;
# DIFFUSION_STEPS=50 by default there, to keep it short).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-}  # empty: the trained demo checkpoint
ENGINES=${ENGINES:-engines}
EXTRA=()
if [ -n "$CONFIG" ]; then EXTRA+=(--num-iter "${NUM_ITER:-16}" --diffusion-steps "${DIFFUSION_STEPS:-50}"); fi
bash scripts/setup.sh
. .venv/bin/activate
d2c-export onnx --stage all ${CONFIG:+--config "$CONFIG"} --out "$ENGINES"
d2c-export check --engines "$ENGINES"
mkdir -p out
d2c-run --engines "$ENGINES" --class 3 --class 7 --num-images 2 --seed 0 "${EXTRA[@]}" --out out/demo.png
if [ -z "$CONFIG" ]; then
  d2c-quality --engines "$ENGINES" --backends torch,ort --per-class "${PER_CLASS:-5}" --json out/quality.json
fi
