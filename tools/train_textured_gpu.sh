#!/usr/bin/env bash
# One GPU call (< 8 min wall on one H100/H200): train the textured world's DiT (time-boxed) with its scorecard
# classifier side by side, then write the model card's figures (dense scorecard, mask oracle, attention maps).
#
#   bash tools/train_textured_gpu.sh OUT_DIR [TRAIN_MINUTES]       (default 5.0 minutes of DiT training)
#   SMOKE=1 DEVICE=cpu bash tools/train_textured_gpu.sh /tmp/smoke  (the same flow with tiny sizes, on a CPU)
#   INIT=vdit_compile/models/textured/weights LR=5e-4 bash tools/train_textured_gpu.sh OUT 6.5   (continue from a weights folder)
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
DEV=${DEVICE:-cuda}
LR=${LR:-1e-3}
INIT_ARGS=()
[ -n "${INIT:-}" ] && INIT_ARGS=(--init-from "$(cd "$INIT" && pwd)")
# the classifier trains beside the DiT for most of its time box (its pan head needs the longer run)
CLF_MIN=$(python3 -c "print(max(2.5, float('$MIN') - 0.5))")
mkdir -p "$OUT/textured"
D="$(cd "$OUT/textured" && pwd)"
cd "$(dirname "$0")/.."
if [ "${SMOKE:-0}" = 1 ]; then
  CLF_SIZE=(--steps 2 --batch 4 --pool 16 --refresh 2 --eval-clips 8 --width 4)
  DIT_SIZE=(--tiny --no-compile --steps 2 --batch 1 --log-every 1 --warmup 1 --sample-steps 1)
  REP_SIZE=(--prompts 2 --steps 1 --batch 2 --oracle-prompts 1 --oracle-steps 1)
else
  CLF_SIZE=(--steps 6000 --batch 64 --pool 2048 --refresh 16 --eval-clips 1024)
  DIT_SIZE=(--steps 100000 --batch 48 --log-every 25 --warmup 150 --sample-steps 50)
  REP_SIZE=(--prompts 64 --steps 50 --batch 16 --oracle-prompts 2 --oracle-steps 10)
fi
quiet() { grep -v "it/s\|s/it\|video/s\|s/video\|call/s\|s/call" || true; }
# the classifier is small: it trains on the same GPU while the DiT does (CPU-side rendering, small kernels)
$PY tools/train_classifier.py --world textured --device "$DEV" --max-minutes "$CLF_MIN" "${CLF_SIZE[@]}" \
    --out "$D/classifier" > "$D/classifier.log" 2>&1 &
CLF=$!
$PY tools/train_reference.py --world textured --device "$DEV" --out "$D" --max-minutes "$MIN" --lr-by-time \
    --lr "$LR" --ema 0.998 --ckpt-minutes 2 --guidance 3 "${DIT_SIZE[@]}" ${INIT_ARGS[@]+"${INIT_ARGS[@]}"} 2>&1 | tee "$D/train.log" | quiet
wait "$CLF" || { echo "classifier training failed:"; tail -30 "$D/classifier.log"; exit 1; }
tail -c 2500 "$D/classifier.log"
cp "$D/classifier/classifier.safetensors" "$D/classifier/classifier.json" "$D/weights/"
$PY tools/world_report.py --world textured --device "$DEV" --weights "$D/weights" --classifier "$D/weights" \
    --out "$D/report" --budget 0.05 "${REP_SIZE[@]}" 2>&1 | tee "$D/report.log" | quiet
ls -la "$D/weights"
