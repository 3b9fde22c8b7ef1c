#!/usr/bin/env python3
"""Train the embedded reference model (Wan DiT + text encoder) on procedural clips, flow matching in pixel space.

Why this script exists: the embedded default model must be reproducible from the repository. Everything is
seeded: the clips of step s come from a generator seeded by (seed, s), and so do the noise, the timesteps and
the caption dropout, so a resumed run sees exactly the batches an uninterrupted one would.

Made for one 10-minute GPU call: --max-minutes stops the loop in time, bf16 autocast, torch.compile of the
DiT, data rendered on the GPU per batch. Checkpoints (weights, EMA, optimizer, RNG, step) go to OUT/ckpt every
--ckpt-minutes and on SIGTERM/SIGINT; --resume continues from there. Outputs in OUT:
  loss.csv, loss.png, weights/ (EMA weights, fp16 safetensors + config.json: what load_pipeline takes),
  samples_g<scale>.gif (a prompt grid sampled with --sample-steps), train_summary.json.
--ship copies weights/ into the package (vdit_compile/models/embedded/weights/), the embedded default.
--world textured trains the textured world's model instead (vdit_compile/models/textured: 16 x 64 x 64 clips,
4,096 video tokens; ships into vdit_compile/models/textured/weights/); --lr-by-time makes the cosine schedule
follow the time box rather than --steps (for a first run whose speed is unknown).

  python tools/train_reference.py --out runs/ref --steps 6000 --max-minutes 8.5 --ship
  python tools/train_reference.py --world textured --out runs/tex --max-minutes 5 --lr-by-time --ship
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vdit_compile.models.embedded import (  # noqa: E402
    SCHEDULER_CONFIG,
    TEXT_ENCODER_CONFIG,
    TINY_TEXT_ENCODER_CONFIG,
    TINY_TRANSFORMER_CONFIG,
    TRANSFORMER_CONFIG,
    WEIGHTS_DIR,
    CaptionTokenizer,
    build_text_encoder,
    build_transformer,
    data,
    load_pipeline,
    save_embedded,
    save_gif,
)
from vdit_compile.models.worlds import WORLDS

GRID_PROMPTS = [
    "a large red circle moving right steadily over a black background",
    "a large green square moving left steadily over a dark blue background",
    "a large blue triangle moving up quickly over a gray background",
    "a large yellow diamond moving down steadily over a dark green background",
    "a large cyan cross rotating steadily over a dark red background",
    "a large magenta circle bouncing quickly over a black checkered background",
    "a small red square growing steadily over a dark blue striped background",
    "a large yellow triangle shrinking quickly over a gray background",
    "a small green diamond moving diagonally quickly over a black background",
    "a small cyan circle moving left slowly over a dark green background",
    "a large blue cross moving right quickly over a gray checkered background",
    "a small magenta triangle moving up steadily and a large yellow square moving right slowly "
    "over a black background",
]


def use_world(name: str) -> None:
    """Point this script's module-level model/data names at a world (the embedded one is the default)."""
    global SCHEDULER_CONFIG, TEXT_ENCODER_CONFIG, TINY_TEXT_ENCODER_CONFIG, TINY_TRANSFORMER_CONFIG, \
        TRANSFORMER_CONFIG, WEIGHTS_DIR, data, load_pipeline, save_embedded, GRID_PROMPTS, CaptionTokenizer
    if name == "embedded":
        return
    from vdit_compile.models import textured as w

    SCHEDULER_CONFIG, TEXT_ENCODER_CONFIG, TRANSFORMER_CONFIG = w.SCHEDULER_CONFIG, w.TEXT_ENCODER_CONFIG, \
        w.TRANSFORMER_CONFIG
    TINY_TEXT_ENCODER_CONFIG, TINY_TRANSFORMER_CONFIG = w.TINY_TEXT_ENCODER_CONFIG, w.TINY_TRANSFORMER_CONFIG
    WEIGHTS_DIR, data, load_pipeline, save_embedded = w.WEIGHTS_DIR, w.data, w.load_pipeline, w.save_textured
    GRID_PROMPTS = w.data.GRID_PROMPTS
    CaptionTokenizer = w.make_tokenizer


def real_grid_attributes(prompts):
    """Renderable attributes of the grid prompts (no jitter), for the real-clip grid beside the samples."""
    if hasattr(data, "canonical_attributes"):
        return [data.canonical_attributes(p, seed=i) for i, p in enumerate(prompts)]
    return [dict(data.parse_caption(p), jitter_x=0.0, jitter_y=0.0, angle0=0.0, lane=0) for p in prompts]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="embedded", choices=WORLDS, help="which procedural world and model")
    p.add_argument("--out", default="runs/reference", help="output directory")
    p.add_argument("--steps", type=int, default=6000, help="planned optimizer steps (sets the LR schedule)")
    p.add_argument("--max-minutes", "--minutes", type=float, default=8.5,
                   help="stop training after this much wall time")
    p.add_argument("--lr-by-time", action="store_true",
                   help="cosine schedule over the time box (--max-minutes) instead of over --steps")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--min-lr-frac", type=float, default=0.1, help="cosine decays to lr * this at --steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the shipped weights")
    p.add_argument("--cfg-drop", type=float, default=0.1, help="caption dropout (null prompt) for CFG")
    p.add_argument("--unk-prob", type=float, default=0.02, help="words replaced by <unk> in training")
    p.add_argument("--shift", type=float, default=None,
                   help="timestep shift (training distribution and the shipped scheduler); > 1 trains more at high "
                        "noise, where motion direction is decided")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", dest="compile", action="store_true", default=None)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--tiny", action="store_true", help="tiny model (tests)")
    p.add_argument("--ckpt-minutes", type=float, default=2.0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt if it exists")
    p.add_argument("--init-from", default=None, metavar="WEIGHTS_DIR",
                   help="fine-tune: start the model and its EMA from these weights ('default' = the shipped ones; "
                        "a fresh optimizer, the LR schedule restarts)")
    p.add_argument("--ship", action="store_true", help="copy the final weights into the package")
    p.add_argument("--sample-steps", type=int, default=50, help="sampling steps for the prompt grid (0: none)")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 5.0],
                   help="guidance scales of the sample grids; the first >1 becomes the default")
    args = p.parse_args(argv)
    use_world(args.world)
    if args.shift is None:
        args.shift = SCHEDULER_CONFIG["shift"]
    return args


# ------------------------------------------------------------------------------------------------ helpers
def step_generators(seed: int, step: int, device):
    """Per-step generators: the data of step s depends only on (seed, s), so resuming is exact."""
    s = (seed * 1_000_003 + step) % (2**62)
    cpu = torch.Generator().manual_seed(s)
    dev = torch.Generator(device=device).manual_seed(s ^ 0x5EED) if torch.device(device).type == "cuda" else \
        torch.Generator().manual_seed(s ^ 0x5EED)
    return cpu, dev, random.Random(s)


def make_batch(args, tokenizer, step, device):
    g_cpu, g_dev, rng = step_generators(args.seed, step, device)
    videos, captions, _ = data.sample_batch(batch=args.batch, generator=g_cpu, device=device)
    captions = ["" if rng.random() < args.cfg_drop else c for c in captions]
    ids, mask = tokenizer(captions, device=device)
    if args.unk_prob > 0:
        unk = (torch.rand(ids.shape, generator=g_dev, device=device) < args.unk_prob) & mask
        ids = ids.masked_fill(unk, tokenizer.unk_id)
    x0 = videos.permute(0, 2, 1, 3, 4) * 2 - 1  # (B, 3, T, H, W) in [-1, 1]
    noise = torch.randn(x0.shape, generator=g_dev, device=device)
    u = torch.sigmoid(torch.randn(args.batch, generator=g_dev, device=device))  # logit-normal timesteps
    t = args.shift * u / (1 + (args.shift - 1) * u)  # shifted towards noise, as the sampler's schedule is
    return x0, noise, t, ids, mask


def flow_loss(transformer, text_encoder, x0, noise, t, ids, mask):
    """Rectified flow: x_t = (1 - t) x0 + t noise, the model predicts the velocity noise - x0."""
    tt = t[:, None, None, None, None]
    xt = (1 - tt) * x0 + tt * noise
    enc = text_encoder(ids, mask)
    pred = transformer(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=enc, return_dict=False)[0]
    return F.mse_loss(pred.float(), (noise - x0).float())


def lr_at(args, step, elapsed_s: float | None = None, rewarm_from: int | None = None):
    """Linear warm-up, then cosine (by step, or by training time with --lr-by-time).

    ``rewarm_from``: the step a resume without optimizer state started at; the learning rate warms up again from
    there (fresh Adam moments would otherwise take full-size steps on second-moment estimates of a few batches).
    """
    if rewarm_from is not None and step - rewarm_from < args.warmup:
        return lr_at(args, step, elapsed_s) * (step - rewarm_from + 1) / args.warmup
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.lr_by_time and elapsed_s is not None:
        u = min(1.0, elapsed_s / (args.max_minutes * 60))
    else:
        u = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * u)))


def module_state(modules: dict) -> dict:
    return {f"{n}.{k}": v.detach().float().cpu().contiguous() for n, m in modules.items()
            for k, v in m.state_dict().items()}


def load_module_state(modules: dict, state: dict):
    for n, m in modules.items():
        m.load_state_dict({k[len(n) + 1:]: v for k, v in state.items() if k.startswith(n + ".")})


def save_checkpoint(out: Path, modules, ema_modules, opt, step, elapsed):
    ck = out / "ckpt"
    tmp = out / "ckpt.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(module_state(modules), str(tmp / "model.safetensors"))
    save_file(module_state(ema_modules), str(tmp / "ema.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"optimizer": opt.state_dict(), "step": step, "elapsed": elapsed, "rng": rng}, tmp / "state.pt")
    shutil.rmtree(ck, ignore_errors=True)
    tmp.rename(ck)


def plot_loss(csv_path: Path, png_path: Path, title: str = "embedded"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(csv_path)))
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    smooth, acc = [], None
    for v in loss:
        acc = v if acc is None else 0.9 * acc + 0.1 * v
        smooth.append(acc)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, loss, alpha=0.3, label="loss (mean over log interval)")
    ax.plot(steps, smooth, label="smoothed")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching MSE")
    ax.set_title(f"{title} DiT training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


def init_weights(source, modules, ema_modules):
    """Copy weights from a save_embedded directory into the model and its EMA (fine-tuning).

    Why: a second training stage (e.g. with shifted timesteps) continues from weights that already render
    shapes and colours instead of spending the call relearning them. The architecture must match.
    """
    src = load_pipeline(device="cpu", weights=WEIGHTS_DIR if source == "default" else Path(source))
    loaded = {"transformer": src.transformer, "text_encoder": src.text_encoder}
    for n in modules:
        state = loaded[n].state_dict()
        own = modules[n].state_dict()
        bad = [k for k in own if k not in state or state[k].shape != own[k].shape]
        if bad:
            raise SystemExit(f"--init-from {source}: its {n} does not match this model's config "
                             f"(first mismatching tensors: {bad[:3]}); expected weights of the same architecture")
        modules[n].load_state_dict(state)
        ema_modules[n].load_state_dict(state)
    print(f"initialised from {source}", flush=True)


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for but no CUDA device is available; pass --device cpu")
    use_compile = (device.type == "cuda") if args.compile is None else args.compile
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    tokenizer = CaptionTokenizer(unknown="error")
    tcfg = TINY_TRANSFORMER_CONFIG if args.tiny else TRANSFORMER_CONFIG
    ecfg = TINY_TEXT_ENCODER_CONFIG if args.tiny else TEXT_ENCODER_CONFIG
    transformer = build_transformer(tcfg).to(device).train()
    text_encoder = build_text_encoder(tokenizer, ecfg).to(device).train()
    modules = {"transformer": transformer, "text_encoder": text_encoder}
    ema_modules = {"transformer": build_transformer(tcfg).to(device).eval(),
                   "text_encoder": build_text_encoder(tokenizer, ecfg).to(device).eval()}
    for n in modules:
        ema_modules[n].load_state_dict(modules[n].state_dict())
        ema_modules[n].requires_grad_(False)
    params = [p for m in modules.values() for p in m.parameters()]
    ema_params = [p for m in ema_modules.values() for p in m.parameters()]
    decay, no_decay = [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.99),
                            fused=device.type == "cuda")

    if args.init_from and not (args.resume and (out / "ckpt" / "state.pt").is_file()):
        init_weights(args.init_from, modules, ema_modules)

    step, elapsed_before, rewarm_from = 0, 0.0, None
    csv_path = out / "loss.csv"
    if args.resume and (out / "ckpt" / "state.pt").is_file():
        load_module_state(modules, load_file(str(out / "ckpt" / "model.safetensors")))
        load_module_state(ema_modules, load_file(str(out / "ckpt" / "ema.safetensors")))
        st = torch.load(out / "ckpt" / "state.pt", map_location="cpu", weights_only=False)
        step, elapsed_before = st["step"], st["elapsed"]
        if "optimizer" in st:
            opt.load_state_dict(st["optimizer"])
        else:  # a slim checkpoint (tools/slim_checkpoint.py): weights, EMA and schedule position only
            rewarm_from = step
            print(f"the checkpoint holds no optimizer state: fresh AdamW moments, learning rate warmed up again over "
                  f"{args.warmup} steps", flush=True)
        torch.set_rng_state(st["rng"]["torch"])
        if "cuda" in st["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["rng"]["cuda"])
        print(f"resumed from {out / 'ckpt'} at step {step}", flush=True)
        if csv_path.is_file():  # drop rows logged after the checkpoint
            rows = [r for r in csv.DictReader(open(csv_path)) if int(r["step"]) <= step]
            with open(csv_path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=["step", "loss", "lr", "elapsed_s", "clips_per_s"])
                w.writeheader()
                w.writerows(rows)
    elif args.resume:
        print(f"--resume: no checkpoint in {out / 'ckpt'}, starting fresh", flush=True)
    if not csv_path.is_file() or step == 0:
        with open(csv_path, "w", newline="") as f:
            f.write("step,loss,lr,elapsed_s,clips_per_s\n")

    n_dit = sum(p.numel() for p in transformer.parameters())
    n_te = sum(p.numel() for p in text_encoder.parameters())
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), torch "
          f"{torch.__version__}, DiT {n_dit / 1e6:.2f} M params, text encoder {n_te / 1e6:.2f} M, batch {args.batch}, "
          f"compile {use_compile}", flush=True)
    fwd = torch.compile(transformer) if use_compile else transformer

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    t_start = time.time()
    t_ckpt = t_start
    acc_loss, acc_n, t_log = torch.zeros((), device=device), 0, time.time()
    bar = tqdm(total=args.steps, initial=step, desc="train", mininterval=10, disable=None)
    stopped_by = "steps"
    while step < args.steps:
        elapsed = elapsed_before + time.time() - t_start
        if elapsed > args.max_minutes * 60:
            stopped_by = "time"
            break
        if stop["signal"] is not None:
            stopped_by = f"signal {stop['signal']}"
            break
        lr = lr_at(args, step, elapsed, rewarm_from)
        for g in opt.param_groups:
            g["lr"] = lr
        x0, noise, t, ids, mask = make_batch(args, tokenizer, step, device)
        with amp:
            loss = flow_loss(fwd, text_encoder, x0, noise, t, ids, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = min(args.ema, (1 + step) / (10 + step))
        torch._foreach_lerp_(ema_params, params, 1 - d)
        step += 1
        acc_loss += loss.detach()
        acc_n += 1
        bar.update()
        if step % args.log_every == 0 or step == args.steps:
            mean = acc_loss.item() / acc_n
            rate = acc_n * args.batch / (time.time() - t_log)
            with open(csv_path, "a") as f:
                f.write(f"{step},{mean:.6f},{lr:.3e},{elapsed_before + time.time() - t_start:.1f},{rate:.1f}\n")
            if step % (args.log_every * 8) == 0 or step <= args.log_every:
                print(f"step {step} loss {mean:.4f} lr {lr:.2e} {rate:.0f} clips/s "
                      f"elapsed {elapsed_before + time.time() - t_start:.0f}s", flush=True)
            acc_loss.zero_()
            acc_n, t_log = 0, time.time()
        if time.time() - t_ckpt > args.ckpt_minutes * 60:
            save_checkpoint(out, modules, ema_modules, opt, step, elapsed_before + time.time() - t_start)
            t_ckpt = time.time()
    bar.close()
    train_s = elapsed_before + time.time() - t_start
    save_checkpoint(out, modules, ema_modules, opt, step, train_s)
    for s, h in old_handlers.items():
        signal.signal(s, h)
    print(f"stopped at step {step} ({stopped_by}) after {train_s / 60:.2f} min of training", flush=True)
    plot_loss(csv_path, out / "loss.png", args.world)

    rows = list(csv.DictReader(open(csv_path)))
    final_loss = sum(float(r["loss"]) for r in rows[-8:]) / max(1, len(rows[-8:])) if rows else float("nan")
    guidance_default = next((g for g in args.guidance if g > 1), 1.0)
    summary = {"world": args.world, "steps": step, "planned_steps": args.steps, "stopped_by": stopped_by, "train_minutes": train_s / 60,
               "batch": args.batch, "lr": args.lr, "shift": args.shift, "ema": args.ema, "seed": args.seed, "compile": use_compile,
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "final_loss_last_logs": final_loss, "dit_params": n_dit,
               "text_encoder_params": n_te, "init_from": args.init_from, "command": " ".join(sys.argv)}
    save_embedded(out / "weights", ema_modules["transformer"], ema_modules["text_encoder"], tokenizer,
                  extra={"training": summary}, guidance_scale=guidance_default,
                  scheduler={**SCHEDULER_CONFIG, "shift": args.shift})

    if args.sample_steps > 0:
        gif_scale = max(1, 128 // data.HEIGHT)  # 128-pixel tiles: a textured 64 x 64 grid at scale 4 would be ~10 MB
        pipe = load_pipeline(device=device, weights=out / "weights")
        gens = [torch.Generator(device=device).manual_seed(i) for i in range(len(GRID_PROMPTS))]
        for g in args.guidance:
            for i, gen in enumerate(gens):
                gen.manual_seed(i)
            t0 = time.time()
            frames = pipe(GRID_PROMPTS, num_inference_steps=args.sample_steps, guidance_scale=g, generator=gens,
                          progress=False).frames
            save_gif(frames, out / f"samples_g{g:g}.gif", columns=4, scale=gif_scale)
            summary[f"sample_seconds_g{g:g}"] = time.time() - t0
        real = data.render(real_grid_attributes(GRID_PROMPTS[:-1]), device=device)
        save_gif(real, out / "real_grid.gif", columns=4, scale=gif_scale)
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.ship:
        WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
        for f in (out / "weights").iterdir():
            shutil.copy2(f, WEIGHTS_DIR / f.name)
        print(f"shipped weights to {WEIGHTS_DIR}", flush=True)
    print(json.dumps(summary, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
