#!/usr/bin/env python
"""Train the scorecard's prompt-adherence classifier on the embedded model's procedural clips.

    python tools/train_classifier.py                      # CPU, writes vdit_compile/eval/weights/
    python tools/train_classifier.py --device cuda --steps 3000 --out /tmp/clf

Recognises the *primary* (first-named, upper-lane in two-object scenes) object's shape, colour and
motion: the same object whose words open the caption (``data.caption_of``), so a prompt's labels are
the top-level keys of its attributes.  Training clips come from a pool of rendered clips that is
partly re-rendered every step (fresh seeds, so the pool does not become the data set), with light
augmentation (noise, contrast/brightness, horizontal flip with left<->right swapped) so generated
clips, which are never as clean as rendered ones, still score.  Held-out clips use seeds from
``vdit_compile.eval.prompts.HELDOUT_SEED_BASE`` on, never drawn in training; their per-attribute
accuracy (the scorecard's ceiling) is written into the weights' JSON and printed.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vdit_compile.eval.classifier import AttributeClassifier, classifier_dir  # noqa: E402
from vdit_compile.eval.prompts import heldout_seeds, is_heldout, labels_of  # noqa: E402
from vdit_compile.models.worlds import WORLDS, scored_attributes, world_data  # noqa: E402

FLIP = {"left": "right", "right": "left"}
# The world being trained on (--world); set by main() before anything renders.
data = world_data("embedded")
ATTRIBUTES = scored_attributes("embedded")
WORLD = "embedded"
DEVICE = torch.device("cpu")


def render(seeds: list[int]) -> tuple[torch.Tensor, list[dict]]:
    videos, _, attrs = data.sample_batch(seeds=seeds, device=DEVICE)
    return (videos * 255).round().to(torch.uint8), attrs


def fresh_seeds(rng: random.Random, n: int) -> list[int]:
    out = []
    while len(out) < n:
        s = rng.randrange(2**62)
        if not is_heldout(s):
            out.append(s)
    return out


def augment(x: torch.Tensor, attrs: list[dict], g: torch.Generator) -> tuple[torch.Tensor, list[dict]]:
    """Noise, contrast/brightness jitter and label-aware horizontal flips of a (B, T, 3, H, W) batch."""
    B = x.shape[0]
    flip = (torch.rand(B, generator=g) < 0.5).tolist()
    out_attrs = []
    for i, a in enumerate(attrs):
        if flip[i] and a["motion"] != "diagonal":  # diagonal is always towards the lower right
            x[i] = x[i].flip(-1)
            a = {**a, "motion": FLIP.get(a["motion"], a["motion"])}
            if "pan" in a:  # the textured world's background drift
                a["pan"] = FLIP.get(a["pan"], a["pan"])
        out_attrs.append(a)
    scale = 1 + 0.1 * (torch.rand(B, 1, 1, 1, 1, generator=g) * 2 - 1)
    shift = 0.03 * (torch.rand(B, 1, 1, 1, 1, generator=g) * 2 - 1)
    sigma = 0.06 * torch.rand(B, 1, 1, 1, 1, generator=g)
    scale, shift, sigma = scale.to(x.device), shift.to(x.device), sigma.to(x.device)
    # on a GPU, noise from the device's RNG (seeded by torch.manual_seed): a CPU draw per step would dominate
    noise = torch.randn(x.shape, generator=g) if x.device.type == "cpu" else torch.randn(x.shape, device=x.device)
    x = x * scale + shift + sigma * noise
    return x.clamp(0, 1), out_attrs


def targets(attrs: list[dict], model: AttributeClassifier, device) -> dict[str, torch.Tensor]:
    lab = labels_of(attrs, WORLD)
    return {n: torch.tensor([model.attributes[n].index(v) for v in vals], device=device) for n, vals in lab.items()}


@torch.no_grad()
def evaluate(model: AttributeClassifier, n: int, device, batch: int = 128) -> dict:
    """Per-attribute accuracy on ``n`` held-out real clips (all, single-object, two-object)."""
    model.eval()
    hits = {k: {n_: 0 for n_ in ATTRIBUTES} for k in ("all", "one", "two")}
    counts = {"all": 0, "one": 0, "two": 0}
    seeds = heldout_seeds(n)
    for i in range(0, n, batch):
        videos, _, attrs = data.sample_batch(seeds=seeds[i : i + batch], device=device)
        pred = model.predict(videos)
        lab = labels_of(attrs, WORLD)
        for j, a in enumerate(attrs):
            group = "two" if a.get("second") else "one"
            counts["all"] += 1
            counts[group] += 1
            for att in ATTRIBUTES:
                ok = int(pred[att][j] == lab[att][j])
                hits["all"][att] += ok
                hits[group][att] += ok
    model.train()
    return {
        k: {att: hits[k][att] / max(counts[k], 1) for att in ATTRIBUTES} | {"clips": counts[k]} for k in hits
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--pool", type=int, default=2048, help="rendered clips kept in memory (uint8)")
    ap.add_argument("--refresh", type=int, default=8, help="pool clips re-rendered from fresh seeds every step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--eval-clips", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="weights directory (default: the world's shipped one)")
    ap.add_argument("--world", default="embedded", choices=WORLDS, help="which procedural world (default embedded)")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop training after this much wall time")
    args = ap.parse_args(argv)
    global data, ATTRIBUTES, WORLD, DEVICE
    WORLD, data, ATTRIBUTES = args.world, world_data(args.world), scored_attributes(args.world)
    DEVICE = torch.device(args.device)
    if args.out is None:
        args.out = classifier_dir(args.world)

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    device = torch.device(args.device)
    temporal = ("motion",) if WORLD == "embedded" else tuple(ATTRIBUTES)
    model = AttributeClassifier(ATTRIBUTES, frames=data.NUM_FRAMES, size=data.HEIGHT, width=args.width,
                                temporal_heads=temporal).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)

    t0 = time.time()
    pool, pool_attrs = [], []
    for i in tqdm(range(0, args.pool, 128), desc="render pool", unit="x128"):
        v, a = render(fresh_seeds(rng, min(128, args.pool - i)))
        pool.append(v)
        pool_attrs += a
    pool = torch.cat(pool)
    bar = tqdm(range(args.steps), desc="train classifier")
    steps_done = 0
    for step in bar:
        if args.max_minutes is not None and time.time() - t0 > args.max_minutes * 60:
            print(f"stopping at step {step} of {args.steps}: --max-minutes {args.max_minutes} reached", flush=True)
            break
        steps_done = step + 1
        idx = torch.randint(0, args.pool, (args.batch,), generator=g)
        x = pool[idx.to(pool.device)].float() / 255
        x, attrs = augment(x, [pool_attrs[i] for i in idx.tolist()], g)
        logits = model(x.to(device))
        tg = targets(attrs, model, device)
        loss = sum(F.cross_entropy(logits[n], tg[n], label_smoothing=0.05) for n in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if args.refresh:
            v, a = render(fresh_seeds(rng, args.refresh))
            slots = torch.randint(0, args.pool, (args.refresh,), generator=g).tolist()
            for k, s in enumerate(slots):
                pool[s], pool_attrs[s] = v[k], a[k]
        bar.set_postfix(loss=f"{loss.item():.3f}")
    train_s = time.time() - t0

    acc = evaluate(model, args.eval_clips, device)
    meta = {
        "labelled_object": "primary (first in the caption; upper lane in two-object scenes)",
        "world": WORLD,
        "heldout_accuracy": acc,
        "training": {
            "command": "python tools/train_classifier.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "steps": steps_done, "planned_steps": args.steps, "batch": args.batch, "pool": args.pool, "refresh": args.refresh, "lr": args.lr,
            "seed": args.seed, "device": str(device), "seconds": round(train_s, 1),
            "torch": torch.__version__, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        },
    }
    path = model.cpu().save(args.out, extra=meta)
    print(json.dumps(acc, indent=2))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) in {train_s:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
