#!/usr/bin/env bash
# One call that shares the GPU between two jobs whose results do not depend on timing (any kind of card):
#   foreground: a textured-world training call (tools/gpu_calls/gpu_call_textured.sh, same env: TOTAL_MIN, REPORT, ...)
#   background: issue 20's FP8 GPU test and the FP8 quality run on the embedded model (QUALITY_ARGS, default
#               256 prompts x 50 steps of the default FP8 choice; run 14 ran "--prompts 64 --batch-size 16 --variants none fp8")
#   bash tools/gpu_calls/gpu_call_tex_fp8q.sh        (carry .gpu-wheels and .whl, + runs/tex-resume to resume)
# $OUT: the training call's files (6) + fp8q.log (test, then quality) + wholestep_quality.jsonl
set -u
: "${OUT:?set OUT to the output folder}"
cd "$(dirname "$0")/../.."
timeout 60 python3 -m pip install --no-deps -q .gpu-wheels/*.whl 2>&1 | grep -v WARNING | tail -1
timeout 60 python3 -m pip install --no-deps -q .whl/torchao-*.whl 2>&1 | grep -v WARNING | tail -1
( export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
  python3 -c "import torch, torchao, diffusers, triton; print(torch.__version__, torchao.__version__, diffusers.__version__, triton.__version__, torch.cuda.get_device_name())"
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_wholestep_fp8.py 2>&1 | tail -15
  echo "test rc=${PIPESTATUS[0]}"
  timeout ${QUALITY_BOX:-330} python3 benchmarks/wholestep_quality.py ${QUALITY_ARGS:---prompts 256 --batch-size 32 --variants fp8} \
    --fp8 on --out $OUT 2>&1 | grep -v "it/s\|s/it"
  echo "quality rc=${PIPESTATUS[0]}" ) > $OUT/fp8q.log 2>&1 &
bash tools/gpu_calls/gpu_call_textured.sh
wait
echo "== fp8q"; tail -12 $OUT/fp8q.log
