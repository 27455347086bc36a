#!/usr/bin/env bash
# The end-to-end demo behind `make demo`: train, export, evaluate and predict on the bundled clip art.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=data/clipart8-demo
OUT=demo-out
rm -rf "$OUT/run" "$OUT/bundle"
mkdir -p "$OUT"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "1. Train: a frozen, ImageNet-pretrained EfficientNet-Lite0 extracts features; a new linear head learns the 8 classes"
echo "   data: $DATA (240 public-domain clip-art images, 30 per class); 20% are held out for validation"
edgexfer train "$DATA" --out "$OUT/run" --cache "$OUT/features.sqlite"

say "2. Train again on the same data: every feature now comes from the SQLite feature cache"
edgexfer train "$DATA" --out "$OUT/run" --cache "$OUT/features.sqlite" --quiet

say "3. Export the bundle: backbone.onnx (uint8 pixels in, features out) + head + golden images + manifest"
edgexfer export "$OUT/run" --out "$OUT/bundle"
ls -l "$OUT/bundle"

say "4. Evaluate the bundle with ONNX Runtime and the numpy head (the code path a device runs)"
echo "   note: these are the demo's own images, most of them seen in training; the honest figure is the"
echo "   validation accuracy printed in step 1"
edgexfer eval "$OUT/bundle" "$DATA" --quiet

say "5. Predict single images"
edgexfer predict "$OUT/bundle" "$DATA/fruit/$(ls $DATA/fruit | head -1)" "$DATA/music/$(ls $DATA/music | head -1)" \
  "$DATA/vehicles/$(ls $DATA/vehicles | head -1)"

say "Done. Run directory: $OUT/run (metrics.json, plots/*.png); bundle: $OUT/bundle"
