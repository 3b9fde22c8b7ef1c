#!/usr/bin/env bash
# One call alone on the GPU (timings; ~9 min; carry .gpu-wheels and .whl):
#   (1) issue 20: the OSP-shaped step with all 32 layers, dense bf16 cuDNN and tile + inductor + FP8 linears, 93f and
#       29f, with FP8's default choice since 2026-12-07 (cross-attention keys/values kept in bf16);
#   (2) issue 17: the Triton row gather's GPU tests (KernelOptions.gather_kernel against index_select);
#   (3) its timing beside index_select in the families benchmark (reorder_ms vs reorder_gather_kernel_ms, and the
#       op's forward with the gather) at two 720p shapes, in the time left.
#   bash tools/gpu_calls/gpu_call_step_gather.sh
# $OUT: call.log, step.jsonl, step.log, gather-test.log, gather.jsonl, families.log
set -u
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to the output folder}"
start=$(date +%s)
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD
exec > >(tee "$OUT/call.log") 2>&1
timeout 60 python3 -m pip install --no-deps -q .gpu-wheels/*.whl 2>&1 | grep -v WARNING | tail -1
timeout 60 python3 -m pip install --no-deps -q .whl/torchao-*.whl 2>&1 | grep -v WARNING | tail -1
python3 -c "import torch, torchao, diffusers, triton; print(torch.__version__, torchao.__version__, diffusers.__version__, triton.__version__, torch.cuda.get_device_name())"
echo "== 1. step, 32 layers, dense and FP8 rows ($(( $(date +%s) - start ))s)"
timeout -k 10 ${STEP_BOX:-330} python3 benchmarks/step.py --frames 24 8 --globals 1 --fp8-only --no-flex \
  --kept-fraction 0.54 --out $OUT > $OUT/step.log 2>&1
echo "step rc=$?"; grep -v "it/s" $OUT/step.log | tail -8
echo "== 2. row gather GPU tests ($(( $(date +%s) - start ))s)"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gather_rows.py \
  "tests/test_kernel_pad.py::test_gather_kernel_changes_nothing_in_the_padded_op_on_gpu" > $OUT/gather-test.log 2>&1
rc=$?; echo "gather test rc=$rc"; tail -3 $OUT/gather-test.log
left=$(( ${CALL_BOX:-575} - ($(date +%s) - start) - 20 ))
if [ $rc = 0 ] && [ $left -gt 40 ]; then
  echo "== 3. families with the row gather, ${left}s"
  timeout -k 10 $left python3 benchmarks/families.py --auto-pad --gather-kernel --no-flex --rep 25 \
    --budget $(( left - 30 )) --shapes wan14b-81f-720p osp-93f-720p --masks win3d-t4h1w1 win3d-t1h1w1 \
    --out $OUT/gather.jsonl > $OUT/families.log 2>&1
  echo "families rc=$?"; tail -4 $OUT/families.log
fi
echo "call total $(( $(date +%s) - start ))s"
