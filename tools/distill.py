#!/usr/bin/env python3
"""Distil a video DiT into a few-step, tile-sparse model (see docs/distill/README.md).

    python tools/distill.py --model embedded --out runs/fewstep
    python tools/distill.py --resume runs/fewstep
    torchrun --nproc-per-node 2 tools/distill.py --model embedded --out runs/fewstep
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vdit_compile.distill.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
