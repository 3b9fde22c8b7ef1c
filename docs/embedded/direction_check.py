# Run from the repository root: PYTHONPATH=. python docs/embedded/direction_check.py [WEIGHTS_DIR [OUT.json [N]]]
# (CPU: ~25 min on a busy 2-core box for N=6; seconds on a GPU)
"""Does the model follow motion-direction words? Opposite prompts, same seeds, 20 steps, g=3."""
import json
import sys
from pathlib import Path

import torch

from vdit_compile.models.embedded import load_pipeline

dev = "cuda" if torch.cuda.is_available() else "cpu"
pipe = load_pipeline(device=dev, weights=Path(sys.argv[1]) if len(sys.argv) > 1 else "default")
out_path = sys.argv[2] if len(sys.argv) > 2 else "direction_check.json"
pairs = [("moving right", "moving left", "x"), ("moving down", "moving up", "y"), ("growing", "shrinking", "area")]
tmpl = "a large red square {} steadily over a black background"
N = int(sys.argv[3]) if len(sys.argv) > 3 else 6
res = {}
for a, b, kind in pairs:
    prompts = [tmpl.format(a)] * N + [tmpl.format(b)] * N
    gens = [torch.Generator(device=dev).manual_seed(i) for i in range(N)] * 2
    f = pipe(prompts, num_inference_steps=20, guidance_scale=3.0, generator=gens, progress=False).frames.float().cpu()
    red = ((f[:, :, 0] > 0.6) & (f[:, :, 1] < 0.4)).float()  # (B, T, H, W)
    ar = torch.arange(32).float()
    area = red.sum((2, 3)).clamp(min=1)
    cx = (red.sum(2) * ar).sum(-1) / area
    cy = (red.sum(3) * ar).sum(-1) / area
    v = {"x": cx, "y": cy, "area": area}[kind]
    d = (v[:, -4:].mean(1) - v[:, :4].mean(1))  # last frames minus first frames
    ok_a = (d[:N] > 0).float().mean().item()
    ok_b = (d[N:] < 0).float().mean().item()
    same = (f[:N] - f[N:]).abs().mean().item()
    res[f"{a}/{b}"] = {"follows_" + a: ok_a, "follows_" + b: ok_b, "mean_abs_diff_same_seed": same,
                       "delta_" + a: [round(x, 1) for x in d[:N].tolist()], "delta_" + b: [round(x, 1) for x in d[N:].tolist()]}
    print(json.dumps(res[f"{a}/{b}"]), flush=True)
json.dump(res, open(out_path, "w"), indent=1)
