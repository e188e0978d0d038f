#!/usr/bin/env bash
# The main job end to end: set up, export every stage, check parity, generate images, and say what it made where.
# By default it exports the trained demo checkpoint (checkpoints/d2c-demo.safetensors, 16 px shapes) and scores
# ONNX Runtime's samples with the shapes classifier (d2c-quality, PER_CLASS=5 images per class, failing below
# MIN_ACCURACY=90 %). The sampling settings are the ones the engines record for their model (the demo's: cfg 1.0,
# 16 masked steps, 500 denoising steps).
# CONFIG=d2c-b bash scripts/demo.sh runs the full-size architecture (random weights, a few minutes on a CPU;
# DIFFUSION_STEPS=50 by default there, to keep it short; no quality step: the classifier knows the demo's shapes only).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-}  # empty: the trained demo checkpoint
ENGINES=${ENGINES:-engines}
EXTRA=()
if [ -n "$CONFIG" ]; then EXTRA+=(--num-iter "${NUM_ITER:-16}" --diffusion-steps "${DIFFUSION_STEPS:-50}"); fi
SECONDS=0
bash scripts/setup.sh
. .venv/bin/activate
d2c-export onnx --stage all ${CONFIG:+--config "$CONFIG"} --out "$ENGINES"
mkdir -p out
d2c-export check --engines "$ENGINES" | tee out/parity.txt
d2c-run --engines "$ENGINES" --class 3 --class 7 --num-images 2 --seed 0 "${EXTRA[@]}" --out out/demo.png \
  --zoomed out/demo_x8.png
QUALITY="skipped (the shapes classifier scores the demo model only)"
QUALITY_RC=0
if [ -z "$CONFIG" ]; then
  d2c-quality --engines "$ENGINES" --backends ort --per-class "${PER_CLASS:-5}" --min-accuracy "${MIN_ACCURACY:-90}" \
    --json out/quality.json || QUALITY_RC=$?
  QUALITY=$(python - <<'PY'
import json
data = json.load(open("out/quality.json"))
line = "; ".join(f"{r['backend']} {r['accuracy']:.1f} % accurate, Frechet {r['frechet']:.1f} ({r['images']} images)"
                 for r in data["reports"])
print(line + (" -- FAIL: " + "; ".join(data["failures"]) if data["failures"] else " -- pass")
      + " (report in out/quality.json)")
PY
)
fi
cat <<SUMMARY

== demo done in $((SECONDS / 60)) min $((SECONDS % 60)) s ==
engines:  $ENGINES/ (manifest.json and one graph per stage)
parity:   $(tail -n 1 out/parity.txt) (table in out/parity.txt)
images:   out/demo.png (exact pixels), out/demo_x8.png (8x larger, for looking at)
quality:  $QUALITY
SUMMARY
exit "$QUALITY_RC"
