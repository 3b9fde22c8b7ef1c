#!/usr/bin/env python3
"""The figures of a world's model card, from trained weights: dense scorecard, mask oracle, attention maps.

    python tools/world_report.py --world textured --weights runs/tex/weights --classifier runs/clf --out runs/report

Writes into --out:
  scorecard.json / scorecard.md  dense sampling (--steps, default 50) on --prompts held-out prompts, scored by the
                                 world's classifier (accuracy per attribute, ceiling, accuracy / ceiling);
  oracle.json                    element-level mask oracle (the same families, metric and selection as
                                 ../shared/oracle/element_oracle.py): per site and head, the sparsest candidate mask
                                 whose relative L2 error of the head's attention output stays within the budget
                                 (max and mean over the recorded calls), mean density over all heads;
  attention_maps.png / .json     per layer and head, where the attention mass lies: mean mass by frame distance
                                 |dt| (rows) and spatial Chebyshev distance in tokens (columns), and the mass
                                 inside 3D windows;
  top_mass.json (--top-mass)     a bound no mask reaches: per query the fewest keys holding a share of its
                                 attention mass, chosen on each input; per head the smallest share within the
                                 budget and its density (if it is above a target, no family can meet the target);
  samples.gif                    generated clips (left) beside the real clips of the same prompts (right).
Runs on CUDA when available (a few minutes on CPU for the oracle alone at 4,096 tokens).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vdit_compile.eval.classifier import load_classifier
from vdit_compile.eval.prompts import prompt_set
from vdit_compile.eval.scorecard import render_table, scorecard, to_json
from vdit_compile.models.worlds import WORLDS, world_package


# ------------------------------------------------------------------------------------------ recording q, k, v
class SDPARecorder:
    """Records q, k, v of every self-attention call over ``L`` tokens (F.scaled_dot_product_attention patched
    for the duration of the ``with`` block, restored after)."""

    def __init__(self, L: int):
        self.L, self.calls = L, []

    def __enter__(self):
        self.orig = F.scaled_dot_product_attention

        def rec(*args, **kw):
            q, k, v = (args + tuple(kw.get(n) for n in ("query", "key", "value"))[len(args):])[:3]
            if q.shape[-2] == self.L and k.shape[-2] == self.L:
                self.calls.append(tuple(x.detach().float().clone() for x in (q, k, v)))
            return self.orig(*args, **kw)

        torch.nn.functional.scaled_dot_product_attention = rec
        return self

    def __exit__(self, *exc):
        torch.nn.functional.scaled_dot_product_attention = self.orig


def candidate_masks(T: int, H: int, W: int, device) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The oracle's candidate families (tile g/w, spatial r, 3D t/r, each 'spatial'/'3d' also +global frame 0)."""
    t, h, w = (x.reshape(-1) for x in torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij"))
    dt = (t[:, None] - t[None, :]).abs()
    dsp = torch.maximum((h[:, None] - h[None, :]).abs(), (w[:, None] - w[None, :]).abs())
    glob = (t[:, None] == 0) | (t[None, :] == 0)
    L = T * H * W
    c = {"dense": torch.ones(L, L, dtype=torch.bool)}
    for g, wd in itertools.product(range(5), range(4)):
        m = dt <= wd
        if g:
            m = m | (t[:, None] < g) | (t[None, :] < g)
        c[f"tile g{g}w{wd}"] = m
    for r in [r for r in (0, 1, 2, 3, 5, 7) if r < max(H, W)]:
        c[f"spatial r{r}"] = dsp <= r
        c[f"spatial r{r} +g1"] = c[f"spatial r{r}"] | glob
        for kt in [k for k in (1, 2, 4, 8) if k < T]:
            c[f"3d t{kt} r{r}"] = (dt <= kt) & (dsp <= r)
            c[f"3d t{kt} r{r} +g1"] = c[f"3d t{kt} r{r}"] | glob
    return {n: m.to(device) for n, m in c.items()}, dt.to(device), dsp.to(device)


@torch.no_grad()
def oracle_and_maps(calls, n_sites: int, heads: int, grid, budget: float, device) -> tuple[dict, torch.Tensor, dict]:
    T, H, W = grid
    cands, dt, dsp = candidate_masks(T, H, W, device)
    dens = {n: float(m.float().mean()) for n, m in cands.items()}
    errs = {n: torch.zeros(n_sites, heads) for n in cands}
    errs_mean = {n: torch.zeros(n_sites, heads) for n in cands}
    n_per_site = len(calls) // n_sites
    nb = max(T, H, W)
    bins = (dt * nb + dsp).reshape(-1)
    mass = torch.zeros(n_sites, heads, nb * nb, device=device, dtype=torch.float64)
    for i, (q, k, v) in enumerate(tqdm(calls, desc="oracle", unit="call")):
        site = i % n_sites
        q, k, v = q.to(device), k.to(device), v.to(device)
        s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, heads, L, L)
        p = torch.softmax(s, -1)
        ref = p @ v
        for hd in range(heads):  # attention mass by (|dt|, spatial distance), summed over batch and queries
            mass[site, hd].index_add_(0, bins, p[:, hd].sum(0).reshape(-1).double())
        del p
        for n, m in cands.items():
            o = torch.softmax(s.masked_fill(~m, float("-inf")), -1) @ v
            e = ((o - ref).flatten(-2).norm(dim=-1) / ref.flatten(-2).norm(dim=-1)).amax(0).cpu()
            errs[n][site] = torch.maximum(errs[n][site], e)
            errs_mean[n][site] += e / n_per_site
    fam = lambda n: n.split()[0]
    res = {}
    for agg, E in (("max", errs), ("mean", errs_mean)):
        for b in sorted({budget, 0.1, 0.2, 0.3}):
            for allowed in (["dense", "tile"], ["dense", "tile", "spatial", "3d"]):
                pick = [[min((dens[n], n) for n in cands if fam(n) in allowed and E[n][si, hd] <= b)
                         for hd in range(heads)] for si in range(n_sites)]
                key = f"{agg}-err<={b} " + "+".join(allowed)
                res[key] = {"mean_density": round(sum(d for row in pick for d, _ in row) / (n_sites * heads), 4),
                            "per_head": [[n for _, n in row] for row in pick]}
    mass = (mass / mass.sum(-1, keepdim=True)).reshape(n_sites, heads, nb, nb).float().cpu()
    return res, mass, dens


TOP_MASS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)


@torch.no_grad()
def top_mass_oracle(calls, n_sites: int, heads: int, budget: float, device, shares=TOP_MASS) -> dict:
    """A practical bound for any mask: per call, head and query, the fewest keys holding a share ``tau`` of that
    query's attention mass (chosen from this input's own scores: dynamic, unstructured). Keeping the heaviest keys
    minimises the dropped mass ``1 - P`` and with it the bound ``2 (1 - P) max|v|`` on the renormalised output's
    error, so a mask of the same density does better only through cancellations among the dropped values. Per head
    the smallest ``tau`` whose relative L2 error of the head's output (largest over the batch, then mean over calls,
    as the family oracle's ``mean`` rows) is within the budget, and its density (mean share of kept entries). Far
    above a target density, no family, static, step-aware or per input, meets the target on this model: the heads'
    attention is spread, not misplaced."""
    n_per_site = len(calls) // n_sites
    err = torch.zeros(len(shares), n_sites, heads, dtype=torch.float64)
    dens = torch.zeros(len(shares), n_sites, heads, dtype=torch.float64)
    for i, (q, k, v) in enumerate(tqdm(calls, desc="top-mass oracle", unit="call")):
        site = i % n_sites
        for hd in range(heads):
            qh, kh, vh = (x[:, hd].to(device) for x in (q, k, v))  # (B, L, D)
            p = torch.softmax((qh @ kh.transpose(-1, -2)) * qh.shape[-1] ** -0.5, -1)  # (B, L, L)
            ref = p @ vh
            srt = torch.sort(p, -1, descending=True).values
            before = srt.cumsum(-1) - srt  # mass of the keys ranked above each one
            for j, tau in enumerate(shares):
                n_keep = (before < tau).sum(-1, keepdim=True)  # keys until the share is reached (>= 1)
                keep = p >= srt.gather(-1, n_keep - 1)
                pk = p * keep
                o = (pk @ vh) / pk.sum(-1, keepdim=True)
                e = ((o - ref).flatten(-2).norm(dim=-1) / ref.flatten(-2).norm(dim=-1)).amax()
                err[j, site, hd] += float(e) / n_per_site
                dens[j, site, hd] += float(keep.double().mean()) / n_per_site
            del p, srt, before
    per_head = []
    for si in range(n_sites):
        row = []
        for hd in range(heads):
            ok = [j for j in range(len(shares)) if err[j, si, hd] <= budget]
            row.append({"share": shares[ok[0]], "density": round(float(dens[ok[0], si, hd]), 4)} if ok
                       else {"share": 1.0, "density": 1.0})
        per_head.append(row)
    mean = sum(h["density"] for row in per_head for h in row) / (n_sites * heads)
    return {"budget": budget, "mean_density": round(mean, 4), "per_head": per_head, "shares": list(shares),
            "mean_err": err.tolist(), "density": dens.tolist()}


def attention_figure(mass: torch.Tensor, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_sites, heads = mass.shape[:2]
    fig, axes = plt.subplots(n_sites, heads, figsize=(max(2.8 * heads, 5.5), 2.5 * n_sites + 0.6), dpi=110,
                             squeeze=False, layout="constrained")
    for si in range(n_sites):
        for hd in range(heads):
            ax = axes[si][hd]
            im = ax.imshow(mass[si, hd].clamp_min(1e-5).log10(), vmin=-4, vmax=0, cmap="magma", origin="upper")
            ax.set_title(f"layer {si} head {hd}", fontsize=8)
            ax.set_xlabel("spatial distance (tokens)", fontsize=7)
            ax.set_ylabel("|dt| (frames)", fontsize=7)
            ax.tick_params(labelsize=6)
    fig.colorbar(im, ax=axes, shrink=0.6, label="log10 attention mass")
    fig.suptitle(title, fontsize=8)
    fig.savefig(path)
    plt.close(fig)


def window_mass(mass: torch.Tensor, grid) -> dict:
    """Fraction of attention mass within |dt| <= kt and spatial distance <= r, per site and head, with the
    window's density (the mass a uniform head would put there) for comparison."""
    T, H, W = grid
    out = {}
    for kt, r in ((0, 0), (1, 1), (2, 2), (4, 3), (15, 3), (2, 15)):
        frames = sum(T - d if d == 0 else 2 * (T - d) for d in range(min(kt, T - 1) + 1)) / T**2
        space = 1.0
        for n in (H, W):
            space *= sum(n - d if d == 0 else 2 * (n - d) for d in range(min(r, n - 1) + 1)) / n**2
        out[f"t{kt} r{r}"] = {"density": round(frames * space, 4),
                              "mass": [[round(float(mass[si, hd, : kt + 1, : r + 1].sum()), 3)
                                        for hd in range(mass.shape[1])] for si in range(mass.shape[0])]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default="textured", choices=WORLDS)
    ap.add_argument("--weights", default="default", help="the model's weights directory (default: shipped)")
    ap.add_argument("--classifier", default=None, help="classifier directory (default: the world's shipped one)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--prompts", type=int, default=64, help="held-out prompts of the dense scorecard (0: skip)")
    ap.add_argument("--steps", type=int, default=50, help="sampling steps of the scorecard")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--guidance", type=float, nargs="+", default=None,
                    help="classifier-free guidance scales of the scorecard (default: the pipeline's); with several, "
                         "one scorecard per scale on the same prompts and seeds (scorecard-g<G>.json), the first "
                         "also as scorecard.json")
    ap.add_argument("--oracle-prompts", type=int, default=2, help="prompts sampled for the oracle (0: skip)")
    ap.add_argument("--oracle-steps", type=int, default=10)
    ap.add_argument("--family-oracle", action=argparse.BooleanOptionalAction, default=True,
                    help="the mask families' oracle and the attention maps (--no-family-oracle: only --top-mass, "
                         "~10 min on a 2-core CPU for 1 prompt x 10 steps instead of ~40)")
    ap.add_argument("--top-mass", action="store_true",
                    help="also the top-mass bound (top_mass.json): per query the fewest keys holding a share of its "
                         "mass, chosen per input; what no static mask family can beat")
    ap.add_argument("--budget", type=float, default=0.05)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    world = world_package(args.world)
    pipe = world.load_pipeline(device=args.device, weights=args.weights)
    t0 = time.time()
    summary = {"world": args.world, "weights": str(args.weights), "device": args.device if args.device == "cpu"
               else torch.cuda.get_device_name(), "torch": torch.__version__,
               "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    if args.prompts:
        clf = load_classifier(args.classifier, world=args.world) if args.classifier else load_classifier(world=args.world)
        # the classifier stays on the CPU: the scorecard's clips come back there
        ps = prompt_set(args.prompts, world=args.world)
        tables, by_guidance = [], {}
        for i, g in enumerate(args.guidance or [None]):
            tag = "" if g is None else f" g{g:g}"
            card_g, clips_g, _ = scorecard(pipe, ps, steps=args.steps, guidance=g, classifier=clf, batch_size=args.batch,
                                           name=f"{args.world} dense {args.steps}{tag}", return_clips=True,
                                           world=args.world)
            if g is not None and len(args.guidance) > 1:
                to_json(card_g, args.out / f"scorecard-g{g:g}.json")
                by_guidance[f"{g:g}"] = {k: card_g.get(k) for k in ("accuracy", "accuracy_vs_ceiling")}
            if i == 0:
                card, clips = card_g, clips_g
            tables.append(render_table(card_g))
        to_json(card, args.out / "scorecard.json")
        table = "\n\n".join(tables)
        (args.out / "scorecard.md").write_text(table + "\n")
        print(table, flush=True)
        summary["scorecard"] = {k: card.get(k) for k in ("accuracy", "ceiling", "accuracy_vs_ceiling", "real_accuracy")}
        if by_guidance:
            summary["scorecard_by_guidance"] = by_guidance
        from vdit_compile.models.embedded import save_gif

        n = min(8, len(ps))
        real = ps.real_clips()[:n]
        save_gif(torch.stack([clips[:n], real], 1).flatten(0, 1), args.out / "samples.gif", columns=4, scale=2)
    if args.oracle_prompts:
        cfg = pipe.transformer.config
        vid = world.VIDEO if hasattr(world, "VIDEO") else {"num_frames": 16, "height": 32, "width": 32}
        p_t, p_h, p_w = cfg.patch_size
        grid = (vid["num_frames"] // p_t, vid["height"] // p_h, vid["width"] // p_w)
        L = grid[0] * grid[1] * grid[2]
        ps = prompt_set(args.oracle_prompts, world=args.world)
        with SDPARecorder(L) as rec:
            for p, s in zip(ps.prompts, ps.seeds):
                pipe(p, num_inference_steps=args.oracle_steps, generator=torch.Generator().manual_seed(s), progress=False)
        n_sites, heads = cfg.num_layers, cfg.num_attention_heads
        if len(rec.calls) != n_sites * args.oracle_steps * args.oracle_prompts:
            raise SystemExit(f"recorded {len(rec.calls)} self-attention calls, expected {n_sites} sites x "
                             f"{args.oracle_steps} steps x {args.oracle_prompts} prompts")
        if args.family_oracle:
            res, mass, dens = oracle_and_maps(rec.calls, n_sites, heads, grid, args.budget, args.device)
            (args.out / "oracle.json").write_text(json.dumps({"grid": grid, "tokens": L, "budget": args.budget,
                                                              "prompts": ps.prompts, "steps": args.oracle_steps,
                                                              "results": res, "candidate_density": dens}, indent=1) + "\n")
            for key, r in res.items():
                print(f"{key:44s} mean element density {r['mean_density']:.3f}", flush=True)
            summary["oracle"] = {k: r["mean_density"] for k, r in res.items()}
            attention_figure(mass, args.out / "attention_maps.png",
                             f"{args.world}: attention mass by |dt| x spatial distance\n({args.oracle_prompts} "
                             f"prompts, {args.oracle_steps} steps, all queries)")
            (args.out / "attention_maps.json").write_text(json.dumps({"window_mass": window_mass(mass, grid),
                                                                      "mass": mass.tolist()}) + "\n")
            summary["window_mass"] = window_mass(mass, grid)
        if args.top_mass:
            tm = top_mass_oracle(rec.calls, n_sites, heads, args.budget, args.device)
            (args.out / "top_mass.json").write_text(json.dumps(tm) + "\n")
            print(f"top-mass bound (dynamic, unstructured) at mean-err<={args.budget}: mean density "
                  f"{tm['mean_density']:.3f}", flush=True)
            summary["top_mass"] = {"budget": args.budget, "mean_density": tm["mean_density"],
                                   "per_head": [[h["density"] for h in row] for row in tm["per_head"]]}
    summary["seconds"] = round(time.time() - t0, 1)
    (args.out / "report_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
