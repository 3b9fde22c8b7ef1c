#!/usr/bin/env bash
# Issue 20's 93f step target decided in one call (~8 min, alone on the GPU; carry .gpu-wheels and .whl), rule stated
# before it runs: the median over three runs of benchmarks/step.py (dense bf16 cuDNN and tile + inductor + FP8, all
# 32 layers; each row the median of 5 timed steps after a warm-up) of the 93f speed-up; before them a forward tile sweep for the frame tile g1w0 at that shape (attention is
# about half of the FP8 step), whose best row is used for the three runs if it beats the table's.
#   bash tools/gpu_calls/gpu_call_step93.sh
# $OUT: call.log, gpu-tests.log, tune.log, tile_table.json (if written), step.jsonl (three runs), step-*.log
source "$(dirname "$0")/_preamble.sh"   # set -u, $OUT, $start, repo root, call.log, wheels, versions
echo "== 0. GPU tests of the reorder (its autograd guard came after run 15's gather tests)"
timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gather_rows.py tests/test_kernel_pad.py \
  > $OUT/gpu-tests.log 2>&1; echo "tests rc=$?"; tail -2 $OUT/gpu-tests.log
echo "== 1. forward tile sweep, osp-93f-720p g1w0"
timeout -k 10 ${TUNE_BOX:-100} python3 benchmarks/attention.py --tune --tune-kinds fwd_tma fwd --shapes osp-93f-720p --masks g1w0 \
  --no-flex --write-table $OUT/tile_table.json --out $OUT > $OUT/tune.log 2>&1
echo "tune rc=$?"; tail -4 $OUT/tune.log
# the sweep's winners (the current table's config is among its candidates) for the step runs; if they win, they go
# into kernels/configs.py afterwards
[ -s $OUT/tile_table.json ] && export VDIT_TILE_TABLE=$OUT/tile_table.json && echo "step runs with $VDIT_TILE_TABLE"
for i in 1 2 3; do
  left=$(( ${CALL_BOX:-575} - ($(date +%s) - start) - 10 ))
  [ $left -lt 60 ] && { echo "no time for run $i"; break; }
  echo "== 2.$i step 93f (${left}s left)"
  timeout -k 10 $left python3 benchmarks/step.py --frames 24 --globals 1 --fp8-only --no-flex --rep 5 --out $OUT > $OUT/step-$i.log 2>&1
  echo "step $i rc=$?"
done
python3 - "$OUT/step.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"way"' in l]
dense = [r["step_ms"] for r in rows if r["way"] == "dense"]
fp8 = [r for r in rows if r["way"].endswith("+ fp8") and "step_ms" in r]
print("dense", dense, "fp8", [r["step_ms"] for r in fp8], "speed-ups", [round(r["speedup"], 3) for r in fp8],
      "median", statistics.median(r["speedup"] for r in fp8) if fp8 else None)
PY
echo "call total $(( $(date +%s) - start ))s"
