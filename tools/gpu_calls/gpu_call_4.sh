#!/usr/bin/env bash
# Session 2026-12-07, GPU call 2: FP8 GPU tests, then the whole-step rows (tile, tile + inductor, tile + FP8) at 93f and 29f.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps -q .gpu-wheels/*.whl 2>&1 | tail -1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/torchao-*.whl 2>&1 | tail -1
export PYTHONPATH=$PWD:/tmp/site
python3 -c "import torch, triton, torchao; print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, torchao.__version__)"
timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_wholestep_fp8.py > $OUT/gpu-fp8-tests.log 2>&1; echo "fp8 tests rc=$?"; tail -3 $OUT/gpu-fp8-tests.log
timeout 380 python3 benchmarks/step.py --fp8 --layers 4 --globals 1 --no-flex --frames 24 8 --kept-fraction 0.54 --out $OUT > $OUT/step.log 2>&1; echo "step rc=$?"
grep -v "^{\"device" $OUT/step.jsonl | cut -c1-330
