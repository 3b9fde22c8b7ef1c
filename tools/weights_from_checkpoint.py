"""Write a shippable weights folder (what ``load_pipeline(weights=DIR)`` takes) from a training checkpoint's EMA.

Why: a run that spans sessions (tools/gpu_calls/gpu_call_textured.sh) ends each call with a checkpoint, not with
weights; its interim weights can still be scored, demoed or shipped without a GPU call: the EMA in
``ckpt/ema.safetensors`` is exactly what ``train_reference.py`` saves as weights when a run ends (fp16, with the
world's config, scheduler and default guidance).

    python tools/weights_from_checkpoint.py docs/textured/run-3/ckpt /tmp/tex-weights --world textured \
        --summary docs/textured/run-3/train_summary.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def world_parts(world: str, tiny: bool = False):
    """(transformer config, text encoder config, scheduler config, tokenizer, save function) of a world
    (``tiny``: the configs of ``train_reference.py --tiny``)."""
    from vdit_compile.models import embedded

    if world == "embedded":
        w, tokenizer, save = embedded, embedded.CaptionTokenizer(unknown="error"), embedded.save_embedded
    elif world == "textured":
        from vdit_compile.models import textured as w

        tokenizer, save = w.make_tokenizer(), w.save_textured
    else:
        raise SystemExit(f"--world: expected 'embedded' or 'textured', found {world!r}")
    if tiny:
        return w.TINY_TRANSFORMER_CONFIG, w.TINY_TEXT_ENCODER_CONFIG, w.SCHEDULER_CONFIG, tokenizer, save
    return w.TRANSFORMER_CONFIG, w.TEXT_ENCODER_CONFIG, w.SCHEDULER_CONFIG, tokenizer, save


def weights_from_checkpoint(ckpt: Path, out: Path, world: str, summary: dict | None = None,
                            guidance_scale: float = 3.0, tiny: bool = False) -> Path:
    from vdit_compile.models.embedded import build_text_encoder, build_transformer

    ema_file = Path(ckpt) / "ema.safetensors"
    if not ema_file.is_file():
        raise SystemExit(f"{ckpt}: expected a checkpoint folder with ema.safetensors (tools/train_reference.py's "
                         f"OUT/ckpt); not found")
    tcfg, ecfg, scfg, tokenizer, save = world_parts(world, tiny)
    modules = {"transformer": build_transformer(tcfg), "text_encoder": build_text_encoder(tokenizer, ecfg)}
    state = load_file(str(ema_file))
    for name, module in modules.items():
        own = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        module.load_state_dict(own, strict=True)  # a checkpoint of another config fails here, naming the keys
    ckpt_state = torch.load(Path(ckpt) / "state.pt", map_location="cpu", weights_only=False) \
        if (Path(ckpt) / "state.pt").is_file() else {}
    if summary and "shift" in summary:  # the run's own sampling shift (train_reference.py --shift)
        scfg = {**scfg, "shift": summary["shift"]}
    training = dict(summary or {}, checkpoint_step=ckpt_state.get("step"),
                    checkpoint_train_minutes=None if "elapsed" not in ckpt_state else ckpt_state["elapsed"] / 60)
    return save(out, modules["transformer"], modules["text_encoder"], tokenizer, extra={"training": training},
                guidance_scale=guidance_scale, scheduler=scfg)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", type=Path, help="checkpoint folder (ema.safetensors, state.pt)")
    ap.add_argument("out", type=Path, help="weights folder to write (model.safetensors, config.json)")
    ap.add_argument("--world", default="textured", choices=["embedded", "textured"])
    ap.add_argument("--summary", type=Path, default=None, help="a train_summary.json recorded in the config")
    ap.add_argument("--guidance", type=float, default=3.0, help="the pipeline's default guidance scale")
    ap.add_argument("--tiny", action="store_true", help="the tiny configs (train_reference.py --tiny)")
    args = ap.parse_args(argv)
    summary = json.loads(args.summary.read_text()) if args.summary else None
    out = weights_from_checkpoint(args.ckpt, args.out, args.world, summary, args.guidance, args.tiny)
    print(f"wrote {out}: " + ", ".join(f"{p.name} {p.stat().st_size / 1e6:.2f} MB" for p in sorted(out.iterdir())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
