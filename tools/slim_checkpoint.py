"""Copy a training checkpoint (``OUT/ckpt`` of tools/train_reference.py) without its optimizer state.

Why: a run that spans sessions keeps its checkpoint in the repository, and AdamW's two moments double its size
(the textured DiT: 10.5 MB of 21 MB).  ``train_reference.py --resume`` accepts the slim copy: same weights, EMA,
step, elapsed time (so ``--lr-by-time`` keeps its place on the cosine) and RNG state, fresh moments with the
learning rate warmed up again.

    python tools/slim_checkpoint.py runs/tex-resume/ckpt docs/textured/run-3/ckpt
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch


def slim(src: Path, dst: Path) -> dict:
    missing = [n for n in ("model.safetensors", "ema.safetensors", "state.pt") if not (src / n).is_file()]
    if missing:
        raise SystemExit(f"{src}: expected a checkpoint folder with model.safetensors, ema.safetensors and state.pt; "
                         f"missing {missing}")
    st = torch.load(src / "state.pt", map_location="cpu", weights_only=False)
    dst.mkdir(parents=True, exist_ok=True)
    for n in ("model.safetensors", "ema.safetensors"):
        shutil.copyfile(src / n, dst / n)
    slim_state = {k: v for k, v in st.items() if k != "optimizer"}
    torch.save(slim_state, dst / "state.pt")
    return slim_state


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    a = ap.parse_args(argv)
    st = slim(a.src, a.dst)
    size = sum(f.stat().st_size for f in a.dst.iterdir()) / 2**20
    print(f"{a.dst}: step {st['step']}, {st['elapsed'] / 60:.2f} min trained, {size:.1f} MiB (no optimizer state)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
