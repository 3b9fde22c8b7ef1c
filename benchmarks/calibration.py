"""Cost of calibration: one ``SiteCalibrator.observe`` call per attention site and call, vs one dense SDPA forward.

    python benchmarks/calibration.py [--shapes cogvideox5b-49f,osp-29f-720p] [--methods mass,exact]
                                     [--kernels fused,twopass] [--sweep] [--json out.jsonl]
    python benchmarks/calibration.py --wan14b [--layers 8] [--plan plan.json] [--json out.jsonl]
    python benchmarks/calibration.py --wan14b --smoke      # tiny sizes on the CPU: the flow, in seconds

Per shape (random bf16 q/k/v, B=1, every family scored, the site's default token tile): the time of one
observation as a ratio to one dense SDPA forward of the same q/k/v, split into the block-statistics kernel
alone (``kernel_ms``) and the rest (``host_ms``: tables, candidate scoring, folding, the copy to the host), and
the observation's peak memory over the inputs as a ratio to SDPA's own working set (q, k, v and its output +
SDPA's peak extra); ``cache_mib``: what the first observation leaves cached on the device for every later call and
site of the same grid (drop tables, segment tables), not counted in the peak.  ``mass`` is the block-statistics
method (Triton on CUDA, ``--kernels`` picks the fused one-launch kernel or the earlier two-pass one); ``exact``
scores every candidate with the exact output error (the CPU method).  ``--sweep``: the fused kernel's time
alone at a few other tile configurations (rows ``sweep``).  Also checks on a small shape that the device's
statistics equal the CPU reference, for both kernels.

``--wan14b``: a Wan2.1-14B-shaped transformer (diffusers ``WanTransformer3DModel``, random weights, bf16: 40
layers (``--layers``), 40 heads of 128, 81 frames at 720p = 21 x 45 x 80 latent tokens, 512 text tokens), built
on the meta device and materialised on the GPU in bf16 (no CPU initialisation of 14B parameters), calibrated end
to end with every family on 2 prompts x 4 steps of recorded inputs (random latents, timesteps 999/750/500/250),
block statistics + the exact verification pass, two step ranges; prints the build, calibration and total wall
times separately, the per-layer calibration time and its extrapolation to 40 layers (target <= 10 min on one
H100), and writes the plan (``--plan``).
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


def _cache_mib(device) -> float | None:
    return None if device.type != "cuda" else torch.cuda.memory_allocated() / 2**20


def bench(name: str, method: str, device: torch.device, repeats: int = 3, kernel: str = "fused") -> dict:
    from vdit_compile.calibration.collector import _mass_tables
    from vdit_compile.kernels.block_stats_triton import block_mass

    layout, H, D = SHAPES[name]
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, H, layout.seq_len, D, device=device, dtype=torch.bfloat16, generator=g) for _ in range(3))
    cal = SiteCalibrator(name, layout, H, families=ALL, method=method)
    cal.mass_kernel = kernel
    before = _cache_mib(device)
    observe = lambda: cal.observe(q, k, v, D ** -0.5, timestep=500.0)
    observe_ms = _timed(observe, device, repeats)  # its warm-up builds the cached tables
    cache = None if before is None else _cache_mib(device) - before
    t = _mass_tables(cal.grid, layout.text_prefix, layout.text_suffix, layout.seq_len, device)
    kern = lambda: block_mass(q, k, D ** -0.5, t.starts, t.lens, t.index, kernel=kernel, tables=t.kernel_tables)
    kernel_ms = _timed(kern, device, repeats) if method == "mass" else None
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v)
    sdpa_ms = _timed(sdpa, device, repeats)
    obs_peak, sdpa_peak = _peak_extra(observe, device), _peak_extra(sdpa, device)
    inputs_mib = 3 * q.numel() * q.element_size() / 2**20
    sdpa_ws = None if sdpa_peak is None else inputs_mib + sdpa_peak  # q, k, v + output and SDPA's workspace
    res = cal.result(0.05)
    verify_ms = verify_peak = None
    if method == "mass":  # the verification pass's call: every candidate's real error on cal.verify_rows rows
        cal.begin_verify(0.05, None, None)
        verify_ms = _timed(observe, device, repeats)
        verify_peak = _peak_extra(observe, device)
    r2 = lambda x: None if x is None else round(x, 2)
    return {"shape": name, "method": method, "kernel": kernel if method == "mass" else None,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "tokens": layout.seq_len, "heads": H, "head_dim": D, "tile": cal.grid.describe(),
            "units": cal.grid.num_units, "candidates": len(cal.candidates),
            "observe_ms": round(observe_ms, 2), "kernel_ms": r2(kernel_ms),
            "host_ms": None if kernel_ms is None else round(observe_ms - kernel_ms, 2),
            "sdpa_bf16_ms": round(sdpa_ms, 3), "observe_over_sdpa": round(observe_ms / sdpa_ms, 2),
            "kernel_over_sdpa": None if kernel_ms is None else round(kernel_ms / sdpa_ms, 2),
            "observe_extra_peak_mib": None if obs_peak is None else round(obs_peak, 1),
            "sdpa_working_set_mib": None if sdpa_ws is None else round(sdpa_ws, 1),
            "extra_memory_over_sdpa_working_set": None if obs_peak is None else round(obs_peak / sdpa_ws, 3),
            "cache_mib": r2(cache), "chosen_families": sorted({m.family for m in res.masks}),
            "verify_ms": r2(verify_ms), "verify_over_sdpa": None if verify_ms is None else round(verify_ms / sdpa_ms, 2),
            "calibration_call_over_sdpa": None if verify_ms is None else round((observe_ms + verify_ms) / sdpa_ms, 2),
            "verify_extra_memory_over_sdpa_working_set": None if verify_peak is None else round(verify_peak / sdpa_ws, 3)}


#: ``--sweep``: other fused-kernel tile configurations (block_m, block_n, num_warps, num_stages) timed per shape.
SWEEP = ((128, 64, 4, 2), (128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3))


def sweep(name: str, device: torch.device, repeats: int = 3) -> list[dict]:
    """The fused kernel alone at ``SWEEP``'s configurations and at the default (``fused_config``)."""
    from vdit_compile.calibration.collector import _mass_tables
    from vdit_compile.kernels.block_stats_triton import block_mass_fused, fused_config

    layout, H, D = SHAPES[name]
    g = torch.Generator(device=device).manual_seed(0)
    q, k = (torch.randn(1, H, layout.seq_len, D, device=device, dtype=torch.bfloat16, generator=g) for _ in range(2))
    cal = SiteCalibrator(name, layout, H, families=ALL, method="mass")
    t = _mass_tables(cal.grid, layout.text_prefix, layout.text_suffix, layout.seq_len, device)
    d = fused_config(D, int(t.lens.min()))
    rows = []
    for bm, bn, w, st in ((d["block_m"], d["block_n"], d["num_warps"], d["num_stages"]),) + SWEEP:
        fn = lambda: block_mass_fused(q, k, D ** -0.5, t.starts, t.lens, t.index, block_m=bm, block_n=bn,
                                      num_warps=w, num_stages=st, tables=t.kernel_tables)
        try:
            ms = round(_timed(fn, device, repeats), 2)
        except Exception as exc:  # noqa: BLE001 - a configuration that does not fit (shared memory) is reported
            ms = f"{type(exc).__name__}: {str(exc)[:80]}"
        rows.append({"sweep": name, "block_m": bm, "block_n": bn, "num_warps": w, "num_stages": st, "kernel_ms": ms,
                     "default": (bm, bn, w, st) == (d["block_m"], d["block_n"], d["num_warps"], d["num_stages"])})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def check_device_matches_cpu(device: torch.device) -> float:
    """Mass statistics on the device (Triton on CUDA) vs the exact CPU path: frame mass and error estimates."""
    layout = TokenLayout(5, 4, 6, text_prefix=7, text_suffix=3)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, layout.seq_len, 16, generator=g) for _ in range(3))
    a = SiteCalibrator("cpu", layout, 3, families=ALL, tile_tokens=4, method="mass")
    a.observe(q, k, v, 0.3)
    diff = 0.0
    for kernel in ("fused", "twopass"):
        b = SiteCalibrator("dev", layout, 3, families=ALL, tile_tokens=4, method="mass")
        b.mass_kernel = kernel
        b.observe(q.to(device), k.to(device), v.to(device), 0.3)
        diff = max(diff, float((a.candidate_errors() - b.candidate_errors()).abs().max()),
                   float((a.frame_mass() - b.frame_mass()).abs().max()))
    return diff


#: The Wan2.1-14B transformer's configuration (diffusers ``WanTransformer3DModel``) and a tiny one for ``--smoke``.
WAN14B = {"model": dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                        out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                        qk_norm="rms_norm_across_heads", eps=1e-6),
          "latent": (21, 90, 160), "text_tokens": 512}
SMOKE = {"model": dict(WAN14B["model"], num_attention_heads=2, attention_head_dim=12, text_dim=32, freq_dim=16,
                       ffn_dim=48, num_layers=2),
         "latent": (3, 8, 12), "text_tokens": 8}


def build_wan(device: torch.device, dtype: torch.dtype, config: dict, seed: int = 0) -> torch.nn.Module:
    """A ``WanTransformer3DModel`` with random weights built on the meta device and materialised on ``device`` in
    ``dtype`` (no full-size initialisation anywhere else): modules with ``reset_parameters`` (linears, norms,
    convolutions) use it, the other parameters get the model's own rule (modulation tables ``randn / sqrt(dim)``,
    norm weights one, biases zero); the rotary tables (non-persistent buffers) come from a layer-less copy."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    with torch.device("meta"):
        model = WanTransformer3DModel(**config)
    model = model.to(dtype).to_empty(device=device)
    with torch.device(device):
        ref = WanTransformer3DModel(**dict(config, num_layers=0))
    bufs = dict(ref.named_buffers())
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name not in bufs:
                raise RuntimeError(f"buffer {name} has no initial value (not in the layer-less model)")
            buf.copy_(bufs[name].to(buf.dtype))
        del ref, bufs
        done = set()
        for m in model.modules():
            if hasattr(m, "reset_parameters") and any(True for _ in m.parameters(recurse=False)):
                m.reset_parameters()
                done.update(id(p) for p in m.parameters(recurse=False))
        for name, p in model.named_parameters():
            if id(p) in done:
                continue
            if "scale_shift_table" in name:
                p.normal_().div_(p.shape[-1] ** 0.5)
            elif name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(std=0.02)
    return model.eval().requires_grad_(False)


def wan14b(device: torch.device, prompts: int = 2, steps: int = 4, layers: int = 40, smoke: bool = False,
           plan_path: str | None = None, mass_kernel: str | None = None) -> dict:
    """The Wan-14B-shaped end-to-end calibration (module doc); ``smoke``: the same flow at tiny sizes;
    ``mass_kernel``: the block-statistics kernel to use instead of the default (set on the calibrator class for this
    benchmark process only)."""
    import vdit_compile as vc
    from vdit_compile.calibration.collector import SiteCalibrator

    if mass_kernel:
        SiteCalibrator.mass_kernel = mass_kernel

    spec = SMOKE if smoke else WAN14B
    cfg = dict(spec["model"], num_layers=layers)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t_start = time.perf_counter()
    model = build_wan(device, dtype, cfg)
    _sync(device)
    t_built = time.perf_counter()
    params = sum(p.numel() for p in model.parameters())
    print(f"[wan14b] built {layers} layer(s), {params / 1e9:.2f} B parameters, {dtype} on {device} in "
          f"{t_built - t_start:.1f} s", flush=True)
    g = torch.Generator(device=device).manual_seed(0)
    T, Hl, Wl = spec["latent"]
    inputs = []
    for _ in range(prompts):
        text = torch.randn(1, spec["text_tokens"], cfg["text_dim"], generator=g, device=device, dtype=dtype)
        for t in (999, 750, 500, 250)[:steps]:
            inputs.append({"hidden_states": torch.randn(1, cfg["in_channels"], T, Hl, Wl, generator=g, device=device,
                                                        dtype=dtype),
                           "timestep": torch.tensor([t], device=device), "encoder_hidden_states": text,
                           "return_dict": False})
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    print(f"[wan14b] calibrating: {prompts} prompt(s) x {steps} step(s) = {len(inputs)} calls, statistics pass + "
          "verification pass", flush=True)
    vc.optimize(model, calib_inputs=inputs, families=ALL, step_ranges=2, progress=True)
    _sync(device)
    secs = time.perf_counter() - t0
    plan = vc.plan_of(model)
    if plan_path:
        plan.save(plan_path)
    tiled = plan.tiled_sites()
    total = time.perf_counter() - t_start
    fams = sorted({m.family for s in tiled for m in s.masks})
    scored = sorted({c.split("-")[0] if not c.startswith("g") and c != "dense" else "tile"
                     for c in (plan.calibration or {}).get("candidates", [])})
    row = {"run": "wan14b-calibration" + ("-smoke" if smoke else ""),
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "layers": layers, "calls": len(inputs), "mass_kernel": SiteCalibrator.mass_kernel, "build_seconds": round(t_built - t_start, 1),
           "calibration_seconds": round(secs, 1), "total_seconds": round(total, 1),
           "calibration_seconds_per_layer": round(secs / layers, 2),
           "extrapolated_40_layer_minutes": round(secs / layers * 40 / 60, 2),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.type == "cuda" else None,
           "tiled_sites": len(tiled), "sites": len(plan.sites), "step_aware": plan.step_aware,
           "mean_tiled_density": round(sum(s.density for s in tiled) / len(tiled), 4) if tiled else None,
           "families_scored": scored, "families_chosen": fams, "plan": plan_path}
    print(f"[wan14b] calibration {secs:.1f} s ({secs / layers:.2f} s/layer; 40 layers ~ "
          f"{row['extrapolated_40_layer_minutes']} min), total wall {total:.1f} s, plan: {plan_path}", flush=True)
    return row


def write_rows(rows: list[dict], path: str | None) -> None:
    """Every row as a JSON line on stdout, and appended to ``path`` if given (``--json``): the output of this
    benchmark and of ``calibration_estimate.py``, so their result files read alike."""
    for r in rows:
        print(json.dumps(r))
    if path:
        with open(path, "a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--methods", default="mass", help="comma-separated: mass, exact")
    ap.add_argument("--kernels", default="fused,twopass", help="comma-separated block-statistics kernels (mass method)")
    ap.add_argument("--sweep", default=None, help="comma-separated shapes: time the fused kernel at other tile configs")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--wan14b", action="store_true", help="run the Wan-14B-shaped calibration instead")
    ap.add_argument("--layers", "--wan14b-layers", type=int, default=40, help="--wan14b: transformer layers")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--smoke", action="store_true", help="--wan14b at tiny sizes (CPU): the flow only")
    ap.add_argument("--plan", default=None, help="--wan14b: write the plan here")
    ap.add_argument("--mass-kernel", default=None, choices=["fused", "twopass"], help="--wan14b: block-statistics kernel")
    ap.add_argument("--json", default=None, help="append JSON lines here")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.wan14b:
        rows = [wan14b(device, args.prompts, args.steps, args.layers if not args.smoke or args.layers != 40 else 2,
                       smoke=args.smoke, plan_path=args.plan, mass_kernel=args.mass_kernel)]
    else:
        diff = check_device_matches_cpu(device)
        print(f"device vs cpu max abs difference (error estimates, frame mass): {diff:.2e}")
        assert diff < 2e-3, diff
        rows = []
        for s in args.shapes.split(","):
            for m in args.methods.split(","):
                for kern in (args.kernels.split(",") if m == "mass" else ["-"]):
                    rows.append(bench(s, m, device, kernel=kern))
                    print(json.dumps(rows[-1]), flush=True)
        for s in (args.sweep.split(",") if args.sweep else []):
            rows += sweep(s, device)
    write_rows(rows, args.json)


if __name__ == "__main__":
    main()
