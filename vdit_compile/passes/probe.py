"""Token-order probe: check, by running the graph, that video tokens really are frame-major.

Shapes and the sequence ``cat`` say *how many* tokens are video and where the text sits; they
do not prove the video tokens are ordered frame by frame.  Where the graph holds the video
input, the probe runs the graph up to ``q`` of the first tileable site (an
:class:`torch.fx.Interpreter` that stops there: patch embedding and first norm/projection
only), once as is and once per latent input frame with that frame perturbed.  Before the
first attention, tokens do not mix, so perturbing latent frame ``f`` must change exactly the
``P`` tokens of token frame ``f // patch_t`` at ``text_prefix + (f // patch_t) * P``.  If it
does not, the sites with that layout are left dense with the probe's finding as the reason.
Sites whose text length is symbolic (trimmed by value) are probed the same way: the graph runs
on the call's real inputs, so the text length of this call is known and the video block's
position (hence the side the text sits on) is checked too.
"""
from __future__ import annotations

import torch
import torch.fx


_AXIS = {"BCTHW": 2, "BTCHW": 1, "BTHWC": 1}


class _Stop(Exception):
    def __init__(self, value):
        self.value = value


class _UpTo(torch.fx.Interpreter):
    def __init__(self, gm, target):
        super().__init__(gm)
        self.target = target

    def run_node(self, n):
        out = super().run_node(n)
        if n is self.target:
            raise _Stop(out)
        return out


def _run_to(gm, target, inputs):
    try:
        _UpTo(gm, target).run(*inputs)
    except _Stop as s:
        return s.value
    raise RuntimeError("probe target was never reached")


def _video_placeholder(example_inputs, video) -> int | None:
    """Index of the graph input that is the call's video tensor (Dynamo passes the real inputs)."""
    for i, x in enumerate(example_inputs):
        if x is video:
            return i
    return None


def _real(inputs) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return not any(isinstance(x, FakeTensor) for x in inputs)


@torch.no_grad()
def probe_layout(gm: torch.fx.GraphModule, example_inputs, template, grid) -> str | None:
    """``""`` if the token order is confirmed, ``None`` if it cannot be probed here, else what is wrong."""
    src = grid.axes
    idx = _video_placeholder(example_inputs, grid.tensor)
    if idx is None or not _real(example_inputs) or (src not in _AXIS and src != "BNC"):
        return None
    lay, q = template.site.layout, template.match.q
    inputs = list(example_inputs)
    x = inputs[idx]
    base = _run_to(gm, q, inputs)
    lay = lay.resolve(base.shape[-2]) if lay.is_dynamic else lay  # text trimmed by value: this call's length
    P, pre = lay.frame_tokens, lay.text_prefix
    if src == "BNC":
        frames, per = lay.num_frames, P
    else:
        axis = _AXIS[src]
        frames, per = x.shape[axis], None
    patch_t = max(1, frames // lay.num_frames) if per is None else 1
    gen = torch.Generator(device="cpu").manual_seed(0)
    for f in range(frames):
        xp = x.clone()
        if per is None:
            sl = [slice(None)] * x.dim()
            sl[axis] = f
            xp[tuple(sl)] += torch.randn(xp[tuple(sl)].shape, generator=gen).to(xp)
        else:
            xp[:, f * per:(f + 1) * per] += torch.randn(xp[:, f * per:(f + 1) * per].shape, generator=gen).to(xp)
        inputs[idx] = xp
        out = _run_to(gm, q, inputs)
        diff = (out.float() - base.float()).abs()
        diff = diff.amax(dim=tuple(d for d in range(diff.dim()) if d != diff.dim() - 2))
        changed = (diff > 1e-6 * (1 + base.float().abs().max())).nonzero().flatten().tolist()
        tf = f // patch_t
        want = list(range(pre + tf * P, pre + (tf + 1) * P))
        if changed != want:
            shown = changed if len(changed) <= 8 else changed[:4] + ["..."] + changed[-2:]
            return (f"token-order probe: perturbing latent frame {f} changed tokens {shown}, expected the frame-major "
                    f"block {want[0]}..{want[-1]}; video tokens are not frame-major here")
    return ""
