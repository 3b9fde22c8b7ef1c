#!/usr/bin/env bash
# Issue 18: train the textured world's DiT (vdit_compile/models/textured: 4 layers x 128, 1.23 M parameters) over
# several device calls, each ending inside its box.  The checkpoint comes back under $OUT and travels into the next
# call; the call in which the whole run's training time (TOTAL_MIN) is reached also writes the model card's figures
# (dense scorecard with run 2's classifier, mask oracle, attention maps).
#
#   every call: RESUME=docs/textured/run-3 TOTAL_MIN=21 bash tools/gpu_calls/gpu_call_textured.sh   (carry .gpu-wheels)
#   between calls, here (N: the call's files_at), put the checkpoint that came back where the next call reads it:
#     python tools/slim_checkpoint.py /work/.device/N/ckpt docs/textured/run-3/ckpt && \
#     cp /work/.device/N/loss.csv /work/.device/N/train.log docs/textured/run-3/
#   The committed folder holds a slim checkpoint (weights, EMA, step and place on the cosine, RNG; no AdamW moments,
#   which would double it: the device's 64 MiB working tree has no room for a full one beside the package's
#   weights); the trainer warms the learning rate up again over --warmup steps after such a resume (~15 s).
#   Without RESUME the run continues from runs/tex-resume (a full checkpoint, carried) if there is one.
#   smoke:    SMOKE=1 DEVICE=cpu OUT=/tmp/o bash tools/gpu_calls/gpu_call_textured.sh     (tiny sizes, the same flow, ~1 min)
#
# Samples and the shipped default use guidance 2 (since 2026-12-07: in run 16's sweep on 128 prompts it matched 3 on shape,
# beat it on texture (70.3 vs 67.2%) and flicker, and lost one prompt each on motion and pan).
# Env: RESUME     the folder whose ckpt/ (and loss.csv, train.log) the run continues from (default runs/tex-resume)
#      TOTAL_MIN  training minutes of the whole run (the cosine learning rate follows them; default 20)
#      CALL_BOX   seconds this call may use (default 570)      LR (1e-3)   BATCH (48)
#      REPORT=1   write the report in this call even if the run goes on (from the EMA weights it stops with)
#      CLASSIFIER the scorecard's classifier (default: the shipped one, vdit_compile/models/textured/weights: run 2's, 97.3% shape ceiling)
# $OUT (at most 8 files, each < 16 MiB, as the device tool returns them): ckpt/{model,ema}.safetensors,
# ckpt/state.pt, loss.csv, train.log, call.log; once TOTAL_MIN is reached also textured-final.tgz (weights/ with
# the classifier beside the DiT, ready to ship; loss.png, the prompt-grid GIF, report/).
set -u
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to the output folder}"
start=$(date +%s)
PY=${PYTHON:-python3}
DEV=${DEVICE:-cuda}
TOTAL_MIN=${TOTAL_MIN:-20}
CALL_BOX=${CALL_BOX:-570}
CLF=${CLASSIFIER:-vdit_compile/models/textured/weights}
REPORT_S=${REPORT_S:-180}          # what the report needs after training (scorecard 64 x 50 steps + oracle)
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD
exec > >(tee "$OUT/call.log") 2>&1
if [ "$DEV" = cuda ]; then
  timeout 60 $PY -m pip install --no-deps -q .gpu-wheels/*.whl 2>&1 | grep -v WARNING | tail -1
  nvidia-smi --query-gpu=name --format=csv,noheader
fi
if [ "${SMOKE:-0}" = 1 ]; then
  SIZE=(--tiny --no-compile --steps 6 --batch 1 --log-every 1 --warmup 1 --sample-steps 1 --ckpt-minutes 0.01)
  REP=(--prompts 2 --steps 1 --batch 2 --oracle-prompts 1 --oracle-steps 1 --top-mass)
else
  SIZE=(--steps 200000 --batch "${BATCH:-48}" --log-every 25 --warmup 300 --sample-steps 50 --ckpt-minutes 1)
  REP=(--prompts 64 --steps 50 --batch 16 --oracle-prompts 2 --oracle-steps 10 --top-mass)
fi
D=${WORK:-/tmp/tex-train}/textured
rm -rf "$D"; mkdir -p "$D"
done_s=0
RES=${RESUME:-runs/tex-resume}
if [ -f "$RES/ckpt/state.pt" ]; then
  cp -r "$RES/ckpt" "$D/"
  for f in loss.csv train.log; do [ -f "$RES/$f" ] && cp "$RES/$f" "$D/"; done
  done_s=$($PY -c "import torch; print(int(torch.load('$D/ckpt/state.pt', weights_only=False)['elapsed']))")
  echo "resuming: ${done_s}s of ${TOTAL_MIN} min trained"
fi
left=$(( CALL_BOX - ($(date +%s) - start) - 100 ))      # 100 s: after SIGTERM (checkpoint, weights, grid), copies
need=$(( TOTAL_MIN * 60 - done_s + 90 ))                 # 90 s: compile and start
finishes=0
if [ "$need" -le $(( left - REPORT_S )) ]; then finishes=1; left=$(( left - REPORT_S )); fi
[ "${SMOKE:-0}" = 1 ] && finishes=1
if [ "${REPORT:-0}" = 1 ] && [ $finishes = 0 ]; then   # an interim report from the weights this call leaves
  finishes=1; left=$(( left - REPORT_S ))
fi
echo "this call: ${left}s of training box, the run $( [ $finishes = 1 ] && echo finishes here || echo goes on in another call)"
# --foreground: the TERM goes to the trainer only, which checkpoints and exits; without it timeout signals its whole
# process group, inductor's compile workers included (run 14's first call lost its SIGTERM checkpoint, cause unproven)
timeout --foreground -s TERM -k 75 "$left" $PY tools/train_reference.py --world textured --device "$DEV" --out "$D" \
  --max-minutes "$TOTAL_MIN" --lr-by-time --lr "${LR:-1e-3}" --ema 0.998 --guidance 2 --resume "${SIZE[@]}" \
  2>&1 | tee -a "$D/train.log" | grep -v "it/s\|s/it"
echo "train rc=${PIPESTATUS[0]} ($(( $(date +%s) - start ))s)"
cp -r "$D/ckpt" "$OUT/" && cp "$D/loss.csv" "$D/train.log" "$OUT/" 2>/dev/null
if [ $finishes = 1 ] && [ -f "$D/weights/model.safetensors" ]; then
  cp "$CLF/classifier.safetensors" "$CLF/classifier.json" "$D/weights/"
  $PY tools/world_report.py --world textured --device "$DEV" --weights "$D/weights" --classifier "$D/weights" \
    --out "$D/report" --budget 0.05 "${REP[@]}" 2>&1 | grep -v "it/s\|s/it\|video/s\|s/video\|call/s\|s/call" | tail -40
  tar czf "$OUT/textured-final.tgz" -C "$D" weights report loss.png train_summary.json $(cd "$D" && ls *.gif 2>/dev/null)
  ls -la "$OUT/textured-final.tgz"
fi
echo "call total $(( $(date +%s) - start ))s"
