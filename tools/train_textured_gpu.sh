#!/usr/bin/env bash
# One GPU call (< 8 min wall on one H100/H200): train the textured world's DiT (time-boxed) with its scorecard
# classifier side by side, then write the model card's figures (dense scorecard, mask oracle, attention maps).
#
#   bash tools/train_textured_gpu.sh OUT_DIR [TRAIN_MINUTES]       (default 5.0 minutes of DiT training)
#
# Everything lands in OUT_DIR/textured/: weights/ (model.safetensors + config.json + classifier.safetensors +
# classifier.json: copy this folder's files into vdit_compile/models/textured/weights/ to ship), loss.csv,
# loss.png, samples_g3.gif, real_grid.gif, train_summary.json, train.log, classifier.log, ckpt/ (resume with the
# same train_reference.py command plus --resume), report/ (scorecard.json/.md, oracle.json, attention_maps.png/
# .json, samples.gif, report_summary.json).
set -euo pipefail
OUT=${1:?usage: tools/train_textured_gpu.sh OUT_DIR [TRAIN_MINUTES]}
MIN=${2:-5.0}
PY=${PYTHON:-python3}
D="$OUT/textured"
mkdir -p "$D"
cd "$(dirname "$0")/.."
# the classifier is small: it trains on the same GPU while the DiT does (CPU-side rendering, small kernels)
$PY tools/train_classifier.py --world textured --device cuda --steps 2000 --batch 64 --pool 2048 --refresh 16 \
    --max-minutes 1.5 --eval-clips 1024 --out "$D/classifier" > "$D/classifier.log" 2>&1 &
CLF=$!
$PY tools/train_reference.py --world textured --out "$D" --max-minutes "$MIN" --lr-by-time --steps 100000 \
    --batch 48 --lr 1e-3 --warmup 150 --ema 0.998 --log-every 25 --ckpt-minutes 2 --sample-steps 50 --guidance 3 \
    2>&1 | tee "$D/train.log" | grep -v "^train:"
wait "$CLF" || { echo "classifier training failed:"; tail -30 "$D/classifier.log"; exit 1; }
tail -c 3000 "$D/classifier.log"
cp "$D/classifier/classifier.safetensors" "$D/classifier/classifier.json" "$D/weights/"
$PY tools/world_report.py --world textured --weights "$D/weights" --classifier "$D/weights" --out "$D/report" \
    --prompts 64 --steps 50 --batch 16 --oracle-prompts 2 --oracle-steps 10 --budget 0.05 2>&1 \
    | tee "$D/report.log" | grep -v "it/s\|s/it\|video/s\|s/video\|call/s\|s/call"
ls -la "$D/weights"
