"""Mask oracle: the sparsest mask each head could have, per family set, budget and step range.

    python benchmarks/mask_oracle.py [--budgets 0.05,0.1,0.2] [--tile-tokens 1] [--calib-prompts 1]
        [--calib-steps 10] [--ranges 3] [--json out.jsonl] [--prompt-offset 0] [--aggregate pooled|mean]
        [--candidates g0w0,g1w0,...,dense]

It records the q, k, v of every 3D attention site of the embedded model while the pipeline denoises the
demo's calibration prompt(s) (the inputs calibration sees), then for every head scores every candidate of the
family set on every recorded call, exactly: the masked output of dense softmax attention under the
candidate's element mask (``MaskSpec.element_mask``) against the dense output, error = pooled relative L2 of
the head's output over the calls (the calibrator's measure). Per head, the sparsest candidate within the budget
wins; the table gives the mean density over all heads and sites (text included). ``--tile-tokens 1`` states the
window families at token granularity (element level: the reachable bound); the default is the calibration
tile, which makes the oracle the bound for what a calibrated plan of the same candidates can reach.
``--ranges K`` adds the step-aware figure: the calls are split into K contiguous timestep ranges of equal
size and each range gets its own masks by calibration's rule (``calibration.steps.allocate_head``: each range
within the budget on its own calls, the pooled error at most the step-agnostic choice's or half the budget;
its density weighted by its calls). ``--calib-steps`` defaults to 10, the demo's calibration since 2026-12-07.

Compare a calibrated plan with it: ``benchmarks/calibration_families.py`` (same prompts and steps).

Cross-check with ``../shared/oracle/element_oracle.py`` (it records the demo's *scored* prompts and takes, per head,
the mean over calls of each call's relative error, the largest over the batch): ``--prompt-offset 0 --aggregate mean``
records the same calls and applies its measure; ``--candidates g0w0,...,dense`` its frame tiles (its windows are
unclamped token radii, which the project's clamped families do not state, so only the frame-tile column can agree
exactly).
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class RecordSDPA(TorchFunctionMode):
    """Keeps q, k, v (and the call's index) of every SDPA call at the transformer's tileable sites."""

    def __init__(self, sites):
        super().__init__()
        self.sites, self.calls, self.records = sites, 0, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            from vdit_compile.passes.attention import _SDPA_SIG

            site = self.sites[self.calls % len(self.sites)]
            self.calls += 1
            if site.tileable:
                a = _SDPA_SIG.bind(*args, **kwargs).arguments
                self.records.append((site, a["query"].detach(), a["key"].detach(), a["value"].detach(),
                                     a.get("scale") or a["query"].shape[-1] ** -0.5))
        return func(*args, **kwargs)


def score_site(records, candidates, layout, grid, aggregate: str = "pooled"):
    """Per call, as lists over calls: ``(C, H)`` squared error and ``(H,)`` squared norm (``pooled``), or, for
    ``aggregate="mean"`` (the shared element oracle's measure), ``(C, H)`` relative error of the call (the largest
    over the batch's samples) and a norm of 1, so that summing over calls and dividing by their count gives the
    mean over calls of the per-call relative error (:func:`pick` then compares ``sqrt`` of it: see ``main``)."""
    masks = torch.stack([c.element_mask(layout, grid) for c in candidates])  # (C, L, L)
    errs, norms = [], []
    for q, k, v, scale in records:
        s = (q.double() @ k.double().transpose(-1, -2)) * scale  # (B, H, L, L)
        dense = torch.softmax(s, -1) @ v.double()
        n_b = dense.square().sum(dim=(2, 3))  # (B, H)
        e = []
        for m in masks:
            o = torch.softmax(s.masked_fill(~m, float("-inf")), -1) @ v.double()
            e_b = (o - dense).square().sum(dim=(2, 3))  # (B, H)
            e.append(e_b.sum(0) if aggregate == "pooled" else (e_b / n_b.clamp_min(1e-300)).sqrt().amax(0))
        errs.append(torch.stack(e))
        norms.append(n_b.sum(0) if aggregate == "pooled" else torch.ones_like(n_b[0]))
    return errs, norms


def pick(err, norm, dens, budget):
    """Per head, the index of the sparsest candidate with pooled relative error <= budget (ties: lower error, then
    the earlier candidate; dense, last, has error 0)."""
    rel = (err / norm.clamp_min(1e-300)).sqrt()  # (C, H)
    out = []
    for h in range(rel.shape[1]):
        ok = [c for c in range(rel.shape[0]) if rel[c, h] <= budget]
        out.append(min(ok, key=lambda c: (dens[c], float(rel[c, h]), c)))
    return out


def choose(err, norm, dens, budget):
    """Per head, the density of the sparsest candidate with pooled relative error <= budget."""
    return [dens[c] for c in pick(err, norm, dens, budget)]


def choose_ranges(E, N, ranges, dens, budget):
    """Step-aware, calibration's rule (``vdit_compile.calibration.steps.allocate_head``): per head one candidate per
    range, each range within the budget on its own calls, the pooled squared error at most the step-agnostic
    choice's or (budget/2)^2 of the norm; least call-weighted density. Per range, the heads' densities."""
    from vdit_compile.calibration.steps import allocate_head

    single = pick(E.sum(0), N.sum(0), dens, budget)
    out = [[] for _ in ranges]
    for h in range(E.shape[2]):
        errs = [E[r].sum(0)[:, h].tolist() for r in ranges]
        norms = [float(N[r].sum(0)[h]) for r in ranges]
        got = allocate_head(errs, norms, [len(r) for r in ranges], dens, budget, single[h])
        for i, c in enumerate(got):
            out[i].append(dens[c])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="0.05,0.1,0.2")
    ap.add_argument("--families", default="tile;tile,win3d,spatial", help="family sets, ';'-separated")
    ap.add_argument("--tile-tokens", type=int, default=None)
    ap.add_argument("--calib-prompts", type=int, default=1)
    ap.add_argument("--calib-steps", type=int, default=10)
    ap.add_argument("--ranges", type=int, default=3)
    ap.add_argument("--prompt-offset", type=int, default=None,
                    help="first prompt's index (default: the demo's calibration prompts; 0: the demo's scored prompts, "
                         "which ../shared/oracle/element_oracle.py records)")
    ap.add_argument("--aggregate", choices=("pooled", "mean"), default="pooled",
                    help="pooled relative L2 over the calls (calibration's budget, default) or the mean over calls of "
                         "each call's relative error (the shared element oracle's; no step-range column)")
    ap.add_argument("--candidates", default=None,
                    help="comma-separated mask names replacing the family sets' defaults (one row set named 'custom')")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import vdit_compile as vc
    from vdit_compile.calibration.candidates import default_family_candidates
    from vdit_compile.calibration.inputs import capture_transformer_inputs
    from vdit_compile.eval.demo import CALIB_OFFSET
    from vdit_compile.eval.prompts import prompt_set
    from vdit_compile.masks.base import parse_mask
    from vdit_compile.masks.units import UnitGrid
    from vdit_compile.models.embedded import load_pipeline
    from vdit_compile.plans import default_tile
    from vdit_compile.runtime.timestep import call_timestep

    torch.manual_seed(0)
    pipe = load_pipeline(device="cpu")
    offset = CALIB_OFFSET if args.prompt_offset is None else args.prompt_offset
    calib = prompt_set(args.calib_prompts, offset).prompts
    inputs = capture_transformer_inputs(pipe, calib, num_inference_steps=args.calib_steps, device=None, progress=False)
    model = pipe.transformer
    sites = vc.inspect_model(model, inputs[0])
    per_site: dict = {}
    steps = []
    with torch.no_grad():
        for kw in inputs:
            rec = RecordSDPA(sites)
            with rec:
                model(**kw)
            steps.append(call_timestep(model, (), kw))
            for site, q, k, v, scale in rec.records:
                per_site.setdefault(site.name, (site, []))[1].append((q, k, v, scale))
    budgets = [float(b) for b in args.budgets.split(",")]
    order = sorted(range(len(steps)), key=lambda i: -(steps[i] or 0))  # high timesteps first
    K = max(1, min(args.ranges, len(steps)))
    ranges = [order[i * len(order) // K:(i + 1) * len(order) // K] for i in range(K)]
    family_sets = ["custom"] if args.candidates else args.families.split(";")
    for fams in family_sets:
        families = tuple(fams.split(","))
        rows = {b: {"whole": [], "steps": []} for b in budgets}
        for name, (site, recs) in per_site.items():
            lay = site.layout
            tile = (1, 1) if args.tile_tokens == 1 else default_tile(lay, args.tile_tokens)
            grid = UnitGrid(lay.num_frames, lay.height, lay.width, *tile)
            if args.candidates:
                cands = [parse_mask(n) for n in args.candidates.split(",")]
            else:
                cands = default_family_candidates(families, grid)
            dens = [c.density(lay, grid) for c in cands]
            errs, norms = score_site(recs, cands, lay, grid, args.aggregate)
            E, N = torch.stack(errs), torch.stack(norms)  # (calls, C, H), (calls, H)
            if args.aggregate == "mean":  # pick compares sqrt(E/N): square the mean relative error
                E, N = (E.mean(0) ** 2)[None], torch.ones_like(N[:1])
            for b in budgets:
                rows[b]["whole"] += choose(E.sum(0), N.sum(0), dens, b)
                if args.aggregate == "pooled":
                    rows[b]["steps"].append(list(zip(map(len, ranges), choose_ranges(E, N, ranges, dens, b))))
        for b in budgets:
            whole = sum(rows[b]["whole"]) / len(rows[b]["whole"])
            # step-aware: per range the mean over all heads of all sites, weighted by the range's calls
            row = {"families": fams, "budget": b, "tile_tokens": args.tile_tokens, "oracle_density": round(whole, 4),
                   "calls": len(steps), "sites": len(per_site), "aggregate": args.aggregate, "prompt_offset": offset}
            if rows[b]["steps"]:
                tot = 0.0
                for i, r in enumerate(ranges):
                    vals = [d for site_ranges in rows[b]["steps"] for d in site_ranges[i][1]]
                    tot += len(r) * sum(vals) / len(vals)
                row[f"oracle_density_{K}_ranges"] = round(tot / len(steps), 4)
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "a") as fh:
                    fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
