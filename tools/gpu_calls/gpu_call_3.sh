#!/usr/bin/env bash
# Session 2026-12-07, GPU call 1: the CUDA bf16 autocast test (bad-input issue), then the textured world's second
# training run, continued from run 1's weights (its classifier trained again beside it, longer), and its report.
set -u
export PYTHONUNBUFFERED=1
start=$(date +%s)
python3 -m pip install --no-deps -q .gpu-wheels/*.whl 2>&1 | tail -1
nvidia-smi --query-gpu=name --format=csv,noheader; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_bad_input_api.py > $OUT/gpu-autocast.log 2>&1; echo "autocast tests rc=$?"; tail -3 $OUT/gpu-autocast.log
left=$(( 590 - ($(date +%s) - start) ))
MIN=$(python3 -c "print(round(($left - 150) / 60, 2))"); echo "training minutes: $MIN"
INIT=docs/textured/run-1/weights LR=5e-4 timeout $(( left - 5 )) bash tools/train_textured_gpu.sh $OUT/w $MIN > $OUT/world.log 2>&1; echo "world rc=$?"; tail -8 $OUT/world.log
tar czf $OUT/world.tgz -C $OUT/w textured/weights textured/report textured/loss.csv textured/loss.png textured/train_summary.json textured/train.log textured/classifier.log textured/report.log textured/samples_g3.gif 2>/dev/null
tar czf $OUT/ckpt.tgz -C $OUT/w textured/ckpt 2>/dev/null
rm -rf $OUT/w; ls -la $OUT
