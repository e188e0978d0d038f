#!/usr/bin/env bash
# The main job end to end: set up, export every stage, check parity, generate an image.
# By default it exports the trained demo checkpoint (checkpoints/d2c-demo.safetensors, 16 px shapes) and holds
# ONNX Runtime to the reference's sample quality (d2c-quality).
# CONFIG=d2c-b bash scripts/demo.sh runs the full-size architecture (random weights, a few minutes on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-}  # empty: the trained demo checkpoint
ENGINES=${ENGINES:-engines}
# the demo's small diffusion head needs >= 500 denoising steps (d2c_export/quality.py DEMO_SAMPLING)
if [ -z "$CONFIG" ]; then STEPS=500 GUIDANCE=1.0; else STEPS=50 GUIDANCE=4.0; fi
bash scripts/setup.sh
. .venv/bin/activate
d2c-export onnx --stage all ${CONFIG:+--config "$CONFIG"} --out "$ENGINES"
d2c-export check --engines "$ENGINES"
mkdir -p out
d2c-run --engines "$ENGINES" --class 3 --class 7 --num-images 2 --seed 0 \
  --num-iter "${NUM_ITER:-16}" --diffusion-steps "${DIFFUSION_STEPS:-$STEPS}" --cfg "${CFG:-$GUIDANCE}" --out out/demo.png
if [ -z "$CONFIG" ]; then
  d2c-quality --engines "$ENGINES" --backends torch,ort --per-class "${PER_CLASS:-5}" --json out/quality.json
fi
