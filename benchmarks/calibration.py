"""Cost of calibration: one ``SiteCalibrator.observe`` call per attention site and call, vs dense SDPA.

    python benchmarks/calibration.py [--shapes cogvideox5b-49f,osp-29f-720p] [--json out.jsonl]

Inputs are random bf16 q/k/v of real model shapes (B=1); ``observe`` works in fp32 blockwise
(memory O(L x block)).  Also checks on a small shape that the device result equals the CPU one.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from vdit_compile.calibration.collector import SiteCalibrator
from vdit_compile.layout import TokenLayout

SHAPES = {  # name: (layout, heads, head_dim)
    "cogvideox5b-49f": (TokenLayout(13, 30, 45, text_prefix=226), 48, 64),
    "osp-29f-720p": (TokenLayout(8, 45, 80), 24, 96),
    "wan1.3b-81f-480p": (TokenLayout(21, 30, 52, text_suffix=0), 12, 128),
    "embedded-16f": (TokenLayout(16, 8, 8), 4, 64),
}


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bench(name: str, device: torch.device, repeats: int = 3) -> dict:
    layout, H, D = SHAPES[name]
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, H, layout.seq_len, D, device=device, dtype=torch.bfloat16, generator=g) for _ in range(3))
    cal = SiteCalibrator(name, layout, H)
    cal.observe(q, k, v, D ** -0.5)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    _sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        cal.observe(q, k, v, D ** -0.5)
    _sync(device)
    observe_ms = (time.perf_counter() - t) / repeats * 1e3
    peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**20 if device.type == "cuda" else None
    F.scaled_dot_product_attention(q, k, v)
    _sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        F.scaled_dot_product_attention(q, k, v)
    _sync(device)
    sdpa_ms = (time.perf_counter() - t) / repeats * 1e3
    res = cal.result(0.05)
    return {"shape": name, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "tokens": layout.seq_len, "heads": H, "head_dim": D, "candidates": len(cal.candidates),
            "observe_ms": round(observe_ms, 2), "sdpa_bf16_ms": round(sdpa_ms, 3),
            "observe_extra_peak_mib": None if peak is None else round(peak, 1),
            "chosen": sorted({m.name for m in res.masks})}


def check_device_matches_cpu(device: torch.device) -> float:
    layout = TokenLayout(5, 4, 6, text_prefix=7, text_suffix=3)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, layout.seq_len, 16, generator=g) for _ in range(3))
    a, b = SiteCalibrator("cpu", layout, 3), SiteCalibrator("dev", layout, 3)
    a.observe(q, k, v, 0.3)
    b.observe(q.to(device), k.to(device), v.to(device), 0.3)
    return max(float((a.candidate_errors() - b.candidate_errors()).abs().max()),
               float((a.frame_mass() - b.frame_mass()).abs().max()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    diff = check_device_matches_cpu(device)
    print(f"device vs cpu max abs difference (errors, frame mass): {diff:.2e}")
    assert diff < 1e-4, diff
    rows = [bench(s, device) for s in args.shapes.split(",")]
    for r in rows:
        print(json.dumps(r))
    if args.json:
        with open(args.json, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
