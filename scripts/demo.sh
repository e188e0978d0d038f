#!/usr/bin/env bash
# The main job end to end: set up, export every stage, check parity, generate an image.
# CONFIG=d2c-b bash scripts/demo.sh runs the full-size architecture (random weights, a few minutes on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-d2c-tiny}
ENGINES=${ENGINES:-engines}
bash scripts/setup.sh
. .venv/bin/activate
d2c-export onnx --stage all --config "$CONFIG" --out "$ENGINES"
d2c-export check --engines "$ENGINES"
mkdir -p out
d2c-run --engines "$ENGINES" --class 3 --class 7 --num-images 2 --seed 0 \
  --num-iter "${NUM_ITER:-16}" --diffusion-steps "${DIFFUSION_STEPS:-50}" --out out/demo.png
