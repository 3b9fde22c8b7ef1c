"""Cost of calibration: one ``SiteCalibrator.observe`` call per attention site and call, vs one dense SDPA forward.

    python benchmarks/calibration.py [--shapes cogvideox5b-49f,osp-29f-720p] [--methods mass,exact] [--json out.jsonl]
    python benchmarks/calibration.py --wan14b [--json out.jsonl]     # the Wan-14B-shaped calibration run

Per shape (random bf16 q/k/v, B=1, every family scored, the site's default token tile): the time of one
observation as a ratio to one dense SDPA forward of the same q/k/v, and the observation's peak memory over
the inputs as a ratio to SDPA's own working set (q, k, v and its output + SDPA's peak extra).  ``mass`` is the
block-statistics method (Triton on CUDA; what calibration uses on GPU); ``exact`` scores every candidate
with the exact output error (the CPU method).  Also checks on a small shape that the device's statistics
equal the CPU reference.

``--wan14b``: a Wan2.1-14B-shaped transformer (diffusers ``WanTransformer3DModel``, random weights, bf16:
40 layers, 40 heads of 128, 81 frames at 720p = 21 x 45 x 80 latent tokens, 512 text tokens) calibrated
end to end with every family on 2 prompts x 4 steps of recorded inputs (random latents, timesteps
999/750/500/250), block statistics + the exact verification pass; prints the wall time (target <= 10 min on
one H100) and the plan's summary.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from vdit_compile.calibration.collector import SiteCalibrator
from vdit_compile.layout import TokenLayout

ALL = ("tile", "win3d", "spatial")
SHAPES = {  # name: (layout, heads, head_dim)
    "cogvideox5b-49f": (TokenLayout(13, 30, 45, text_prefix=226), 48, 64),
    "osp-29f-720p": (TokenLayout(8, 45, 80), 24, 96),
    "wan1.3b-81f-480p": (TokenLayout(21, 30, 52, text_suffix=0), 12, 128),
    "wan14b-81f-720p": (TokenLayout(21, 45, 80), 40, 128),
    "embedded-16f": (TokenLayout(16, 8, 8), 6, 32),
}


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, repeats):
    fn()  # warm-up (compiles Triton kernels)
    _sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / repeats * 1e3


def _peak_extra(fn, device) -> float | None:
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench(name: str, method: str, device: torch.device, repeats: int = 3) -> dict:
    layout, H, D = SHAPES[name]
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, H, layout.seq_len, D, device=device, dtype=torch.bfloat16, generator=g) for _ in range(3))
    cal = SiteCalibrator(name, layout, H, families=ALL, method=method)
    observe = lambda: cal.observe(q, k, v, D ** -0.5, timestep=500.0)
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v)
    observe_ms = _timed(observe, device, repeats)
    sdpa_ms = _timed(sdpa, device, repeats)
    obs_peak, sdpa_peak = _peak_extra(observe, device), _peak_extra(sdpa, device)
    inputs_mib = 3 * q.numel() * q.element_size() / 2**20
    sdpa_ws = None if sdpa_peak is None else inputs_mib + sdpa_peak  # q, k, v + output and SDPA's workspace
    res = cal.result(0.05)
    return {"shape": name, "method": method, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "tokens": layout.seq_len, "heads": H, "head_dim": D, "tile": cal.grid.describe(),
            "units": cal.grid.num_units, "candidates": len(cal.candidates),
            "observe_ms": round(observe_ms, 2), "sdpa_bf16_ms": round(sdpa_ms, 3),
            "observe_over_sdpa": round(observe_ms / sdpa_ms, 2),
            "observe_extra_peak_mib": None if obs_peak is None else round(obs_peak, 1),
            "sdpa_working_set_mib": None if sdpa_ws is None else round(sdpa_ws, 1),
            "extra_memory_over_sdpa_working_set": None if obs_peak is None else round(obs_peak / sdpa_ws, 3),
            "chosen_families": sorted({m.family for m in res.masks})}


def check_device_matches_cpu(device: torch.device) -> float:
    """Mass statistics on the device (Triton on CUDA) vs the exact CPU path: frame mass and error estimates."""
    layout = TokenLayout(5, 4, 6, text_prefix=7, text_suffix=3)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, layout.seq_len, 16, generator=g) for _ in range(3))
    a = SiteCalibrator("cpu", layout, 3, families=ALL, tile_tokens=4, method="mass")
    b = SiteCalibrator("dev", layout, 3, families=ALL, tile_tokens=4, method="mass")
    a.observe(q, k, v, 0.3)
    b.observe(q.to(device), k.to(device), v.to(device), 0.3)
    return max(float((a.candidate_errors() - b.candidate_errors()).abs().max()),
               float((a.frame_mass() - b.frame_mass()).abs().max()))


def wan14b(device: torch.device, prompts: int = 2, steps: int = 4, layers: int = 40) -> dict:
    """The Wan-14B-shaped end-to-end calibration (module doc)."""
    from diffusers import WanTransformer3DModel

    import vdit_compile as vc

    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128,
                                      in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824,
                                      num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                      eps=1e-6).to(torch.bfloat16).eval()
    g = torch.Generator(device=device).manual_seed(0)
    inputs = []
    for _ in range(prompts):
        text = torch.randn(1, 512, 4096, generator=g, device=device, dtype=torch.bfloat16)
        for t in (999, 750, 500, 250)[:steps]:
            inputs.append({"hidden_states": torch.randn(1, 16, 21, 90, 160, generator=g, device=device,
                                                        dtype=torch.bfloat16),
                           "timestep": torch.tensor([t], device=device), "encoder_hidden_states": text,
                           "return_dict": False})
    _sync(device)
    t0 = time.perf_counter()
    vc.optimize(model, calib_inputs=inputs, families=ALL, step_ranges=2, progress=True)
    _sync(device)
    secs = time.perf_counter() - t0
    plan = vc.plan_of(model)
    tiled = plan.tiled_sites()
    return {"run": "wan14b-calibration", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "layers": layers, "calls": len(inputs), "seconds": round(secs, 1), "minutes": round(secs / 60, 2),
            "tiled_sites": len(tiled), "sites": len(plan.sites), "step_aware": plan.step_aware,
            "mean_tiled_density": round(sum(s.density for s in tiled) / len(tiled), 4) if tiled else None,
            "families": sorted({m.family for s in tiled for m in s.masks})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--methods", default="mass", help="comma-separated: mass, exact")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--wan14b", action="store_true", help="run the Wan-14B-shaped calibration instead")
    ap.add_argument("--wan14b-layers", type=int, default=40)
    ap.add_argument("--json", default=None, help="append JSON lines here")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.wan14b:
        rows = [wan14b(device, layers=args.wan14b_layers)]
    else:
        diff = check_device_matches_cpu(device)
        print(f"device vs cpu max abs difference (error estimates, frame mass): {diff:.2e}")
        assert diff < 2e-3, diff
        rows = []
        for s in args.shapes.split(","):
            for m in args.methods.split(","):
                rows.append(bench(s, m, device))
                print(json.dumps(rows[-1]), flush=True)
    for r in rows:
        print(json.dumps(r))
    if args.json:
        with open(args.json, "a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
