"""Quality cost of FP8 linears and of step caching on the embedded model, with the scorecard.

Each variant samples the same held-out prompts and seeds as the reference (the un-optimised
pipeline, same steps) and is scored with ``vdit_compile.eval.scorecard``: PSNR / SSIM against the
reference, the classifier's accuracy per attribute (and its difference to the reference's), and for
caching the transformer evaluations a sample took (from ``vdit_compile.wholestep.report_of``).
Attention stays dense (``TileMask(dense=True)`` through the op, exact) so that only FP8 / caching
are measured.

FP8 runs through torchao on an sm89+ GPU (``--fp8 on``); ``--fp8 emulate`` runs FP8's numerics in
fp32 on any device (quality only).  One JSON line per variant goes to ``--out/wholestep_quality.jsonl``.

    python benchmarks/wholestep_quality.py --out $OUT --prompts 64 --variants fp8 --fp8 on      # GPU
    python benchmarks/wholestep_quality.py --out out --prompts 32 --variants taylorseer:2 taylorseer:3 fbc:0.05
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_variant(text: str, fp8_mode: str) -> tuple[str, dict]:
    """``none`` | ``fp8`` | ``fp8:keep=GLOB,GLOB`` | ``POLICY[:THRESHOLD]`` | ``fp8+POLICY[:THRESHOLD]`` -> (name,
    optimize options).

    ``none`` is the optimised pipeline with neither (the compiled path's own difference to the reference)."""
    opts: dict = {}
    for part in text.split("+"):
        if part == "none":
            continue
        if part == "fp8":
            opts["fp8"] = fp8_mode
            continue
        if part.startswith("fp8:keep="):  # FP8 with extra linears kept in high precision (globs, comma-separated)
            opts["fp8"] = fp8_mode
            opts["fp8_keep"] = [g for g in part[len("fp8:keep="):].split(",") if g]
            continue
        policy, _, thr = part.partition(":")
        from vdit_compile.wholestep.caching import POLICIES

        if policy not in POLICIES:
            raise SystemExit(f"unknown variant part {part!r}: expected fp8 or one of {POLICIES}[:threshold]")
        opts["cache"] = policy
        if thr:
            opts["cache_threshold"] = float(thr)
    return text, opts


def paired_flips(ref_clips: list, clips: list, attrs) -> dict:
    """Per attribute: clips the reference got right and the variant wrong (``lost``), the reverse (``gained``), and
    the two-sided exact sign-test (McNemar) p-value of that split: whether an accuracy change of a few points is more
    than the prompts' noise (same prompts and seeds, so the comparison is paired)."""
    from math import comb

    out = {}
    for a in attrs:
        right = [(r[f"pred_{a}"] == r[f"label_{a}"], c[f"pred_{a}"] == c[f"label_{a}"]) for r, c in zip(ref_clips, clips)]
        lost, gained = sum(x and not y for x, y in right), sum(y and not x for x, y in right)
        n = lost + gained
        p = min(1.0, 2 * sum(comb(n, i) for i in range(min(lost, gained) + 1)) / 2 ** n) if n else 1.0
        out[a] = dict(lost=lost, gained=gained, sign_test_p=round(p, 4))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--variants", nargs="+", default=["taylorseer", "fbc"])
    ap.add_argument("--fp8", default="auto", choices=["on", "auto", "emulate"], help="what 'fp8' in a variant means")
    ap.add_argument("--cache-warmup", type=int, default=None)
    ap.add_argument("--backend", default="eager", choices=["eager", "auto", "inductor"],
                    help="optimize()'s backend: eager (default) measures the same numerics without inductor's "
                         "compile time per variant")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    import vdit_compile as vc
    from vdit_compile.eval.prompts import prompt_set
    from vdit_compile.eval.scorecard import scorecard
    from vdit_compile.models.embedded import load_pipeline
    from vdit_compile.wholestep import report_of

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    pipe = load_pipeline(device=args.device, dtype=dtype)
    ps = prompt_set(args.prompts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fh = open(out / "wholestep_quality.jsonl", "a")

    def sink(row):
        print(json.dumps(row), flush=True)
        fh.write(json.dumps(row) + "\n")
        fh.flush()

    meta = dict(device=torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)",
                dtype=str(dtype), torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                argv=sys.argv, prompts=args.prompts, steps=args.steps)
    sink(meta)
    ref_card, ref_clips, _ = scorecard(pipe, ps, steps=args.steps, batch_size=args.batch_size, name="reference",
                                       return_clips=True)
    ref_acc = ref_card.get("accuracy", {})
    sink(dict(variant="reference", accuracy=ref_acc, seconds_per_video=ref_card["seconds_per_video"]))
    for text in args.variants:
        name, opts = parse_variant(text, args.fp8)
        if args.cache_warmup is not None and "cache" in opts:
            opts["cache_warmup"] = args.cache_warmup
        if "fp8" in opts:  # the FP8 error check on real activations: one recorded transformer call
            from vdit_compile.calibration.inputs import capture_transformer_inputs

            opts_call = dict(calib_inputs=capture_transformer_inputs(pipe, ps.prompts[:1], num_inference_steps=4,
                                                                     max_calls=1, device=None, progress=False))
        else:
            opts_call = {}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*backend='eager' quantises.*")
            vc.optimize(pipe, plan=vc.TileMask(dense=True), progress=False, backend=args.backend, **opts, **opts_call)
        try:
            card = scorecard(pipe, ps, steps=args.steps, batch_size=args.batch_size, reference=ref_clips, name=name)
            rep = report_of(pipe) or {}
        finally:
            vc.restore(pipe)
        acc = card.get("accuracy", {})
        row = dict(variant=name, options=opts, backend=args.backend, psnr=card.get("psnr"), ssim=card.get("ssim"), accuracy=acc,
                   accuracy_delta_points={k: 100 * (acc[k] - ref_acc[k]) for k in acc if k in ref_acc},
                   paired_flips=paired_flips(ref_card.get("per_clip", []), card.get("per_clip", []),
                                             [k for k in acc if k in ref_acc]),
                   seconds_per_video=card["seconds_per_video"])
        if rep.get("cache"):
            c = rep["cache"]
            row.update(evaluated_fraction=c["evaluated_fraction"], evaluations_per_sample=[s["evaluations"] for s in c["samples"]],
                       calls_per_sample=[s["calls"] for s in c["samples"]])
        if rep.get("fp8") and rep["fp8"].get("mode") != "off":
            f = rep["fp8"]
            row.update(fp8_mode=f["mode"], fp8_quantized=len(f["quantized"]), fp8_kept=f["kept"])
        elif "fp8" in opts:
            row.update(fp8_mode="off", fp8_note=rep.get("fp8", {}).get("note"))
        sink(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
