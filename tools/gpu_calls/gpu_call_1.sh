#!/usr/bin/env bash
# Session 2026-12-06, GPU call 1: kernel GPU tests (families included), the textured world's training + report,
# then the window-family kernel benchmark. Results under $OUT (world outputs packed into one archive).
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps -q .gpu-wheels/*.whl 2>&1 | tail -1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
start=$(date +%s)
timeout 140 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernel_gpu.py > $OUT/gpu-tests.log 2>&1; echo "gpu tests rc=$?"; tail -4 $OUT/gpu-tests.log
timeout 330 bash tools/train_textured_gpu.sh $OUT/w 3.6 > $OUT/world.log 2>&1; echo "world rc=$?"; tail -6 $OUT/world.log
tar czf $OUT/world.tgz --exclude=ckpt -C $OUT/w textured 2>/dev/null; cp $OUT/w/textured/weights/model.safetensors $OUT/textured-model.safetensors 2>/dev/null
rm -rf $OUT/w
left=$(( 585 - ($(date +%s) - start) ))
echo "families benchmark: ${left}s left"
[ $left -gt 40 ] && timeout $left python3 benchmarks/families.py --shapes wan14b-81f-720p osp-93f-720p --masks win3d-t4h1w1 win3d-t1h1w1 spatial-h0w0-g1 --rep 40 --out $OUT/families.jsonl > $OUT/families.log 2>&1
python3 tools/families_summary.py $OUT/families.jsonl
