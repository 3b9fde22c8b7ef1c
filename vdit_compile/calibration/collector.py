"""Per-site calibration statistics and the per-head mask search.

A :class:`SiteCalibrator` is attached to one 3D attention site while the model runs on the
calibration inputs.  Every call of the site feeds it ``(q, k, v, scale)``; it accumulates, per
head,

1. the **frame-by-frame attention mass**: for query group ``i`` and key group ``j`` (the ``T``
   frames, then one group for all text tokens), the mean over query tokens of the softmax
   probability falling on keys of group ``j``.  Rows sum to 1.
2. for every candidate :class:`~vdit_compile.masks.TileMask`, the squared L2 distance between
   the masked attention output and the dense output, and the squared norm of the dense output,
   so that the relative error is taken over *all* calibration data of the site.

Both come out of one blockwise pass over the query rows: a block of ``r`` rows computes its
``(B, H, r, L)`` scores, then per key group a log-sum-exp and a partial output
``exp(s_g - m_g) @ v_g``.  Any mask's output is a flash-attention style merge of the partials of
the groups it keeps, so all candidates cost one dense pass plus a small ``einsum``.  Peak memory
is ``O(B * H * r * L)``, never ``L x L``; ``r`` is picked to keep the score block under
``block_bytes``.

Sites whose text is trimmed by value (Mochi, HunyuanVideo 1.5, Framepack) have a layout with a
per-call text length (``TokenLayout.dynamic_text``): each call is split with its own text length,
the text group simply holds more or fewer tokens, and densities are reported at the mean
observed text length.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..layout import TokenLayout
from ..masks.tile import TileMask, mask_density

#: Working-memory budget of one row block of ``observe`` (bytes); bounds memory to O(L x block).
#: Larger on CUDA, where small blocks would leave the GPU idle.
DEFAULT_BLOCK_BYTES = {"cpu": 64 * 2**20, "cuda": 1024 * 2**20}


def default_candidates(num_frames: int) -> list[TileMask]:
    """The mask family searched by default: ``g in 0..min(T,4)``, ``w in 0..min(T-1,2)``, plus dense.

    Masks that keep every tile at this ``T`` are dropped (``dense`` stands for them) and masks
    with the same frame pattern at this ``T`` are kept once, the one with the smallest ``g``
    then ``w``: it is the more conservative choice when the plan is applied at another ``T``.
    """
    T = num_frames
    raw = [TileMask(g, w) for g in range(0, min(T, 4) + 1) for w in range(0, min(T - 1, 2) + 1)]
    return dedupe_candidates(raw, T)


def dedupe_candidates(candidates: Sequence[TileMask], num_frames: int) -> list[TileMask]:
    """Drop masks equal to another (earlier) one at ``num_frames``; all-kept masks become ``dense``."""
    seen: set[bytes] = set()
    out: list[TileMask] = []
    full = torch.ones(num_frames, num_frames, dtype=torch.bool)
    for m in list(candidates) + [TileMask(dense=True)]:
        fm = m.frame_mask(num_frames)
        if not m.dense and bool(fm.all()):
            continue
        key = fm.numpy().tobytes() if not torch.equal(fm, full) else b"dense"
        if key in seen:
            continue
        seen.add(key)
        out.append(m)
    return out


def _group_partials(qb, k_vid, v_vid, k_txt, v_txt, scale: float, T: int, P: int):
    """Per key group (``T`` frames, then text) of a row block: max score ``m``, normaliser ``l``
    (both ``(B, H, r, T+1)``) and unnormalised partial output ``o`` ``(B, H, r, T+1, D)``.

    An empty text group has ``m = -inf``, ``l = 0``, ``o = 0`` so merges ignore it.
    """
    B, H, r, _ = qb.shape
    G = T + 1
    m = torch.full((B, H, r, G), float("-inf"), dtype=qb.dtype, device=qb.device)
    l = torch.zeros(B, H, r, G, dtype=qb.dtype, device=qb.device)
    o = torch.zeros(B, H, r, G, v_vid.shape[-1], dtype=qb.dtype, device=qb.device)
    qb = qb * scale
    s = (qb @ k_vid.transpose(-1, -2)).view(B, H, r, T, P)
    m[..., :T] = s.amax(-1)
    e = s.sub_(m[..., :T, None]).exp_()
    l[..., :T] = e.sum(-1)
    o[:, :, :, :T] = (e.transpose(2, 3) @ v_vid).transpose(2, 3)  # (B,H,T,r,P) @ (B,H,T,P,D)
    if k_txt.shape[2]:
        st = qb @ k_txt.transpose(-1, -2)
        mt = st.amax(-1, keepdim=True)
        et = st.sub_(mt).exp_()
        m[..., T] = mt[..., 0]
        l[..., T] = et.sum(-1)
        o[:, :, :, T] = et @ v_txt
    return m, l, o


@dataclass
class SiteResult:
    """Outcome of calibrating one site.

    ``masks``/``errors``/``densities`` are per head (the chosen mask, its relative L2 error on
    the calibration data, its density under the site's layout).  ``frame_mass`` is
    ``(H, T+1, T+1)``: query group x key group, frames ``0..T-1`` then text at index ``T``.
    ``within_budget[h]`` is False when no candidate met the budget under ``max_density`` and
    the least-error one inside the density bound was taken instead (``notes`` says so).
    """

    masks: list[TileMask]
    errors: list[float]
    densities: list[float]
    frame_mass: torch.Tensor
    candidates: list[TileMask] = field(default_factory=list)
    candidate_errors: torch.Tensor | None = None  # (H, C)
    candidate_densities: list[float] = field(default_factory=list)
    within_budget: list[bool] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    observations: int = 0

    @property
    def density(self) -> float:
        return sum(self.densities) / len(self.densities) if self.densities else 1.0


class SiteCalibrator:
    """Accumulates attention statistics of one site and picks per-head masks (see module doc)."""

    def __init__(
        self,
        name: str,
        layout: TokenLayout,
        num_heads: int,
        candidates: Sequence[TileMask] | None = None,
        block_bytes: int | None = None,
    ):
        if layout is None:
            raise ValueError(f"site {name!r}: a SiteCalibrator needs a TokenLayout, found None")
        if num_heads < 1:
            raise ValueError(f"site {name!r}: num_heads must be >= 1, found {num_heads}")
        self.name, self.layout, self.num_heads = name, layout, int(num_heads)
        T = layout.num_frames
        self.candidates = dedupe_candidates(candidates, T) if candidates is not None else default_candidates(T)
        self.block_bytes = block_bytes  # None: DEFAULT_BLOCK_BYTES of the inputs' device type
        G = T + 1
        self._mass_sum = torch.zeros(num_heads, G, G, dtype=torch.float64)
        self._mass_count = torch.zeros(G, dtype=torch.float64)
        self._err_sq = torch.zeros(num_heads, len(self.candidates), dtype=torch.float64)
        self._norm_sq = torch.zeros(num_heads, dtype=torch.float64)
        self.observations = 0
        # (C, G, G) float keep tables: candidate c, query group, key group (text row/col always kept).
        keep = torch.ones(len(self.candidates), G, G)
        for c, m in enumerate(self.candidates):
            keep[c, :T, :T] = m.frame_mask(T).float()
        self._keep = keep
        self._text_tokens: list[int] = []  # text tokens of every observed call (varies for dynamic layouts)

    @staticmethod
    def _query_groups(lay: TokenLayout) -> torch.Tensor:
        T = lay.num_frames
        return torch.cat([torch.full((lay.text_prefix,), T), torch.arange(T).repeat_interleave(lay.frame_tokens),
                          torch.full((lay.text_suffix,), T)])

    # ------------------------------------------------------------------ observe
    @torch.no_grad()
    def _call_layout(self, L: int, padding_cut: bool) -> TokenLayout | None:
        """This call's layout, or ``None`` when ``L`` tokens do not fit the site's layout."""
        lay = self.layout
        if lay.is_dynamic:
            return lay.resolve(L) if L >= lay.static_tokens else None
        if L == lay.seq_len:
            return lay
        fixed = lay.text_prefix + lay.video_tokens
        if padding_cut and fixed <= L < lay.seq_len:  # the padded end of the text suffix was cut off
            return TokenLayout(lay.num_frames, lay.height, lay.width, lay.text_prefix, L - fixed, lay.order)
        return None

    def observe(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                padding_cut: bool = False) -> None:
        """Accumulate statistics of one call; ``q, k, v`` are ``(B, H, L, D)`` on any device/dtype.

        ``padding_cut``: the call's padded text tokens at the end of the sequence were cut off (only
        its valid tokens are given), so a fixed text suffix may hold fewer tokens than the layout's.
        """
        if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
            raise ValueError(
                f"site {self.name!r}: observe expects q, k, v of shape (B, H, L, D) with equal B, H, L; "
                f"found q{tuple(q.shape)}, k{tuple(k.shape)}, v{tuple(v.shape)}"
            )
        B, H, L, D = q.shape
        if H != self.num_heads:
            raise ValueError(f"site {self.name!r}: calibrator was built for {self.num_heads} heads, observed {H}")
        lay = self._call_layout(L, padding_cut)
        if lay is None:
            raise ValueError(
                f"site {self.name!r}: observed a sequence of {L} tokens but calibration started with the layout "
                f"{self.layout.describe()} ({self.layout.seq_len} tokens); calibrate at one frame count and "
                "resolution (a plan made at T frames applies at other frame counts, see docs/calibration.md)"
            )
        scale = float(scale) if scale is not None else D ** -0.5
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        dev = q.device
        qgroup_cpu = self._query_groups(lay)
        T, P, pre, suf = lay.num_frames, lay.frame_tokens, lay.text_prefix, lay.text_suffix
        kf, vf = k.to(acc), v.to(acc)
        k_vid = kf[:, :, pre : pre + T * P]
        v_vid = vf[:, :, pre : pre + T * P].reshape(B, H, T, P, -1)
        text_idx = torch.cat([torch.arange(pre), torch.arange(L - suf, L)]).to(dev)
        k_txt, v_txt = kf[:, :, text_idx], vf[:, :, text_idx]
        keep = self._keep.to(device=dev, dtype=acc)
        qgroup = qgroup_cpu.to(dev)
        C, G = len(self.candidates), T + 1
        budget = self.block_bytes or DEFAULT_BLOCK_BYTES.get(dev.type, DEFAULT_BLOCK_BYTES["cuda"])
        # scores + exp (+ a temporary), per-group partials, candidate outputs and their differences
        per_row = B * H * (3 * L + 2 * G * D + C * (2 * D + 2 * G)) * torch.finfo(acc).bits // 8
        rows_per_block = max(1, min(L, budget // per_row))
        err = torch.zeros(H, len(self.candidates), dtype=torch.float64, device=dev)
        norm = torch.zeros(H, dtype=torch.float64, device=dev)
        mass = torch.zeros(H, T + 1, T + 1, dtype=torch.float64, device=dev)
        for start in range(0, L, rows_per_block):
            stop = min(L, start + rows_per_block)
            qb = q[:, :, start:stop].to(acc)
            m, l, o = _group_partials(qb, k_vid, v_vid, k_txt, v_txt, scale, T, P)
            qg = qgroup[start:stop]
            # dense: merge all groups
            m_all = m.amax(-1, keepdim=True)
            w_all = torch.exp(m - m_all)  # (B,H,r,G); -inf groups -> 0
            z_all = (w_all * l).sum(-1)
            group_mass = w_all * l / z_all[..., None]
            out_dense = torch.einsum("bhrg,bhrgd->bhrd", w_all, o) / z_all[..., None]
            mass.index_add_(1, qg, group_mass.sum(0).to(torch.float64))
            norm += out_dense.square().sum((0, 2, 3)).to(torch.float64)
            # candidates: keep table rows of each query's group -> (C, r, G)
            # merged relative to each candidate's own max over the groups it keeps, so a mask whose
            # kept scores are far below the dropped ones (exp underflow against the dense max) stays exact
            kr = keep[:, qg].bool()
            mk = torch.where(kr[None, None], m[:, :, None], float("-inf"))  # (B,H,C,r,G)
            wk = torch.exp(mk - mk.amax(-1, keepdim=True))  # own frame is always kept: the max is finite
            z_c = (wk * l[:, :, None]).sum(-1)
            out_c = torch.einsum("bhcrg,bhrgd->bhcrd", wk, o).div_(z_c[..., None]).sub_(out_dense[:, :, None])
            err += out_c.square_().sum((0, 3, 4)).to(torch.float64)
        self._mass_sum += mass.cpu()
        self._mass_count += torch.bincount(qgroup_cpu, minlength=T + 1).double() * B
        self._text_tokens.append(lay.text_prefix + lay.text_suffix)
        self._err_sq += err.cpu()
        self._norm_sq += norm.cpu()
        self.observations += 1

    # ------------------------------------------------------------------ results
    def frame_mass(self) -> torch.Tensor:
        """Mean attention mass ``(H, T+1, T+1)`` [query group, key group]; text is index ``T``."""
        count = self._mass_count.clamp(min=1)
        return (self._mass_sum / count[None, :, None]).float()

    def candidate_errors(self) -> torch.Tensor:
        """Relative L2 error ``(H, C)`` of every candidate against dense over all observed data."""
        return (self._err_sq / self._norm_sq.clamp(min=1e-300)[:, None]).sqrt()

    def density_layout(self) -> TokenLayout:
        """The layout densities are reported for: for a per-call text length, the mean observed one."""
        if not self.layout.is_dynamic:
            return self.layout
        n = round(sum(self._text_tokens) / len(self._text_tokens)) if self._text_tokens else 0
        return self.layout.resolve(self.layout.static_tokens + n)

    def candidate_densities(self) -> list[float]:
        T = self.layout.num_frames
        lay = self.density_layout()
        return [mask_density(m.frame_mask(T), lay) for m in self.candidates]

    def result(self, error_budget: float, max_density: float | None = None) -> SiteResult:
        """Choose per head the sparsest candidate with error <= ``error_budget`` (and density <= ``max_density``).

        Ties in density go to the lower error, then to the earlier candidate (smaller ``g``, ``w``).
        When nothing fits, the least-error candidate within ``max_density`` is taken (or the
        sparsest candidate when even that bound cannot be met) and the head is reported as
        over budget.
        """
        if self.observations == 0:
            raise RuntimeError(f"site {self.name!r}: no calibration data was observed")
        if error_budget < 0:
            raise ValueError(f"error_budget must be >= 0, found {error_budget}")
        errs = self.candidate_errors()
        dens = self.candidate_densities()
        masks, errors, densities, ok, notes = [], [], [], [], []
        order = range(len(self.candidates))
        for h in range(self.num_heads):
            e = errs[h].tolist()
            in_bound = [c for c in order if max_density is None or dens[c] <= max_density + 1e-12]
            feasible = [c for c in in_bound if e[c] <= error_budget]
            if feasible:
                best = min(feasible, key=lambda c: (dens[c], e[c], c))
                note = ""
            elif in_bound:
                best = min(in_bound, key=lambda c: (e[c], dens[c], c))
                bound = "" if max_density is None else f" at density <= {max_density:g}"
                note = (f"no mask within error {error_budget:g}{bound}; "
                        f"took least-error {self.candidates[best].name} (error {e[best]:.4g})")
            else:
                best = min(order, key=lambda c: (dens[c], e[c], c))
                note = (f"no mask reaches density <= {max_density:g}; took sparsest "
                        f"{self.candidates[best].name} (density {dens[best]:.4g}, error {e[best]:.4g})")
            masks.append(self.candidates[best])
            errors.append(float(e[best]))
            densities.append(float(dens[best]))
            ok.append(not note)
            notes.append(note)
        return SiteResult(masks, errors, densities, self.frame_mass(), list(self.candidates), errs.float(),
                          dens, ok, notes, self.observations)
