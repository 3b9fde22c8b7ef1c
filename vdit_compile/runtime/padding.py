"""Tile attention under a text-padding mask whose padded tokens are all at the end of the sequence.

HunyuanVideo pads its text to a fixed length and masks the padding: a ``(B, 1, 1, L)`` key mask
(1.0, Framepack with batch > 1) or the ``(B, 1, L, L)`` outer product ``valid_i & valid_j``
(1.5, which first moves every valid text token before the padded ones).  In both the sequence is
``[fixed prefix] + video + text`` and a row ``b`` keeps exactly the keys ``[0, M_b)``.  Then:

* rows ``[0, M_b)`` are tile attention over the first ``M_b`` tokens: the op on the truncated
  sequence, whose text suffix is the row's valid text;
* rows ``[M_b, L)`` (padded text queries) are dense SDPA of those rows under their mask rows:
  exactly what the model computes there (all keys masked gives SDPA's zeros), at ``(L - M_b) x L``
  cost, text only.

Anything else (a mask with holes, padded video, float masks with other values) returns ``None``
and the caller runs dense masked attention with a warning.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import TokenLayout


def _tail_length(keep: torch.Tensor) -> int | None:
    """``M`` when ``keep`` (``(L,)`` bool) is ``M`` trues followed by falses, else ``None``."""
    m = int(keep.sum())
    return m if bool(keep[:m].all()) else None


def valid_lengths(mask: torch.Tensor, batch: int, seq_len: int) -> list[int] | None:
    """Per batch row, the number of leading tokens the padding mask keeps; ``None`` if it is not tail padding.

    Accepts boolean ``(B|1, 1, 1, L)`` key masks and ``(B|1, 1, L, L)`` masks equal to the outer
    product of their diagonal (the valid-token mask), each row's valid tokens a prefix ``[0, M)``.
    """
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-1] != seq_len:
        return None
    if mask.shape[0] not in (1, batch) or mask.shape[2] not in (1, seq_len):
        return None
    out = []
    for b in range(batch):
        mb = mask[b if mask.shape[0] > 1 else 0, 0]
        keep = mb[0] if mb.shape[0] == 1 else torch.diagonal(mb)
        if mb.shape[0] > 1 and not torch.equal(mb, keep[:, None] & keep[None, :]):
            return None
        m = _tail_length(keep)
        if m is None:
            return None
        out.append(m)
    return out


def servable_lengths(mask: torch.Tensor, layout: TokenLayout, batch: int, seq_len: int) -> list[int] | None:
    """:func:`valid_lengths` when the padding is all in the text suffix (video and fixed prefix kept), else ``None``."""
    lens = valid_lengths(mask, batch, seq_len)
    if lens is None or layout.dynamic_text == "prefix" or min(lens) < layout.text_prefix + layout.video_tokens:
        return None  # padding inside the video or the prefix: not what the op can serve
    return lens


def padded_tile_attention(q, k, v, layout: TokenLayout, mask: torch.Tensor, grid, masks: str, scale: float):
    """Exact tile attention of ``(B, H, L, D)`` inputs under a tail-padding ``mask``, or ``None`` (see module doc).

    ``layout`` is the site's layout; its text suffix (fixed or per call) absorbs the padding.
    """
    B, _, L, _ = q.shape
    lens = servable_lengths(mask, layout, B, L)
    if lens is None:
        return None
    fixed = layout.text_prefix + layout.video_tokens
    rows = []
    for b, m in enumerate(lens):
        sl = slice(b, b + 1)
        out = torch.ops.vdit.tile_attention(q[sl, :, :m], k[sl, :, :m], v[sl, :, :m], layout.text_prefix, m - fixed,
                                            list(grid), masks, float(scale))[0]
        if m < L:  # padded text queries: dense under their own mask rows
            mb = mask[sl] if mask.shape[0] > 1 else mask  # (1, 1, 1 or L, L)
            pad = F.scaled_dot_product_attention(q[sl, :, m:], k[sl], v[sl], attn_mask=mb[:, :, m:] if mb.shape[2] > 1 else mb,
                                                 scale=scale)
            out = torch.cat([out, pad.to(out.dtype)], dim=2)
        rows.append(out)
    return torch.cat(rows, dim=0)
