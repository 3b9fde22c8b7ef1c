"""Python functions that rewritten graphs call at run time.

``observe_site`` (inspect/calibrate mode) records which site ran and feeds calibrators;
``apply_shared`` (apply mode, graphs shared by several blocks) looks up the masks of the block
that is running and calls ``torch.ops.vdit.tile_attention`` (or dense SDPA when the plan leaves
that block dense).  Sites with a text-padding mask come here too: padding at the end of the
sequence runs the op on the valid tokens (:mod:`.padding`); any other mask runs dense with a
warning.  Both receive the ids of their :class:`~.state.OptimizeState` and template.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.args import encode_masks, op_grid
from .padding import padded_tile_attention, servable_lengths
from .state import OptimizeState


def _as_bhld(t, x):
    return x.unsqueeze(1) if t.merged_heads else x


def observe_site(q, k, v, anchor, state_id: int, template_id: int, scale: float, mask=None) -> None:
    state = OptimizeState.get(state_id)
    t = state.templates[template_id]
    site = state.resolve(t, anchor)
    state.record_site(site)
    if state.mode != "calibrate" or not site.tileable or not state.site_filter_allows(site.name):
        return None
    cal = state.calibrators.get(site.name)
    if cal is None:
        from ..calibration.collector import SiteCalibrator

        cfg = state.config
        cands = cfg.candidate_masks() if hasattr(cfg, "candidate_masks") else None
        cal = state.calibrators[site.name] = SiteCalibrator(
            site.name, site.layout, site.num_heads, cands, families=getattr(cfg, "families", ("tile",)),
            tile_tokens=getattr(cfg, "tile_tokens", None), method="auto")
    q, k, v = (_as_bhld(t, x.detach()) for x in (q, k, v))
    from .timestep import call_timestep

    step = call_timestep(state.root, *state.call)  # statistics per denoising step (step-aware plans)
    if _nothing_masked(mask):
        cal.observe(q, k, v, scale, timestep=step)
        return None
    lens = None if t.merged_heads else servable_lengths(mask, site.layout, q.shape[0], q.shape[2])
    if lens is None:
        state.warn_once(f"calib-mask:{site.name}", f"vdit-compile: site {site.name} got a mask that is not text padding "
                        "at the end of the sequence during calibration (such calls run dense); it is not calibrated on it")
        return None
    for b, m in enumerate(lens):  # the valid tokens only: what the model (and the op) attend to
        cal.observe(q[b:b + 1, :, :m], k[b:b + 1, :, :m], v[b:b + 1, :, :m], scale, padding_cut=True,
                    timestep=step)
    return None


def _nothing_masked(mask) -> bool:
    if mask is None:
        return True
    return bool(mask.all()) if mask.dtype == torch.bool else bool((mask == 0).all())


def _dense(t, q, k, v, scale, mask):
    if t.merged_heads:
        s = (q @ k.transpose(-1, -2)) * scale
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
        return torch.softmax(s, -1) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def apply_shared(q, k, v, anchor, state_id: int, template_id: int, scale: float, mask=None):
    """Tile attention for the module instance running a shared graph, or with a key-padding mask."""
    state = OptimizeState.get(state_id)
    t = state.templates[template_id]
    site = state.resolve(t, anchor)
    state.record_site(site)
    masks = state.masks_for(site)
    if masks is None:
        return _dense(t, q, k, v, scale, mask)
    grid, names = op_grid(site.layout, state.tile_for(site)), encode_masks(masks)
    if not _nothing_masked(mask):
        out = None if t.merged_heads else padded_tile_attention(q, k, v, site.layout, mask, grid, names, float(scale))
        if out is None:
            state.warn_once(f"padding:{site.name}", f"vdit-compile: site {site.name} got a mask that is not text padding "
                            "at the end of the sequence, which the tile op cannot honour; this call runs dense masked attention")
            return _dense(t, q, k, v, scale, mask)
        state.rewritten.add(site.name)
        return out
    state.rewritten.add(site.name)
    lay = site.layout.resolve(q.shape[-2]) if site.layout.is_dynamic else site.layout  # this call's text length
    out = torch.ops.vdit.tile_attention(_as_bhld(t, q), _as_bhld(t, k), _as_bhld(t, v), lay.text_prefix,
                                        lay.text_suffix, grid, names, float(scale))[0]
    return out.squeeze(1) if t.merged_heads else out
