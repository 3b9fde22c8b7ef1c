"""Per-site calibration statistics and the per-head mask search.

A :class:`SiteCalibrator` is attached to one 3D attention site while the model runs on the
calibration inputs.  Every call of the site feeds it ``(q, k, v, scale)`` and the call's denoising
timestep; it accumulates, per head,

1. the **frame-by-frame attention mass** (for ``plan show``): units are the site's calibration grid (whole
   frames when only frame-level families are searched, else the site's token tile,
   :func:`~.candidates.calibration_grid`) and one group for all text tokens; each call's unit-by-unit
   mass (for query group ``i`` and key group ``j``, the sum over query tokens of the softmax probability
   on keys of ``j``) is folded to frames at once, so memory stays ``O(H T^2)`` at any tile size.
2. per **timestep** and for every candidate mask (every family, deduped at the grid), the squared L2
   distance between the masked attention output and the dense output, and the squared norm of the
   dense output, so that the relative error is taken over *all* calibration data of a range of steps.

Both come out of one blockwise pass over the query rows, in *unit order* (video tokens permuted so
each unit is contiguous, :func:`~vdit_compile.masks.units.unit_permutation`): a block of ``r`` rows
computes its ``(B, H, r, L)`` scores, then per key group a log-sum-exp and a partial output
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

import functools
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple, Sequence

import torch

from ..kernels.block_stats_triton import DEFAULT_MASS_KERNEL
from ..layout import TokenLayout
from ..masks.base import MaskSpec, masks_density
from ..masks.tile import TileMask
from ..masks.units import UnitGrid, unit_permutation
from .allocation import within_density
from .candidates import calibration_grid, dedupe_unit_candidates, default_family_candidates, keep_tables

#: Working-memory budget of one row block of ``observe`` (bytes); bounds memory to O(L x block).
#: Larger on CUDA, where small blocks would leave the GPU idle.
DEFAULT_BLOCK_BYTES = {"cpu": 64 * 2**20, "cuda": 1024 * 2**20}


#: Working memory of one chunk of candidates scored at once from the group-mass matrix (bytes).  Small enough
#: that scoring adds about 1% of a Wan-14B SDPA call's working set (a chunk is one einsum launch; 4 at that grid).
_SCORE_CHUNK_BYTES = 32 * 2**20


class _MassTables(NamedTuple):
    """Per (grid, text lengths, device): what the block-mass path needs besides ``q, k``, built once."""

    starts: torch.Tensor  # (S,) int64, CPU: segment starts in unit order
    lens: torch.Tensor  # (S,) int64, CPU
    index: torch.Tensor | None  # (L,) device: token of each unit-order position (None: tokens are in unit order)
    group: torch.Tensor  # (S,) device: segment -> group (units, then text)
    rows: torch.Tensor  # (G,) float64 device: query rows per group, clamped to >= 1
    pairs: torch.Tensor  # (S * S,) int64 device: (query segment, key segment) -> query group * G + key group
    kernel_tables: tuple  # the fused kernel's (seg, ends) on the device


@functools.lru_cache(maxsize=16)
def _mass_tables(grid: UnitGrid, prefix: int, suffix: int, L: int, device: torch.device) -> _MassTables:
    from ..kernels.block_stats_triton import segment_tables, segments

    N, U = grid.num_units, grid.unit_tokens
    st, ln, grp = segments(prefix, N, U, suffix)
    index = None
    if not grid.in_unit_order:  # unit order = text prefix, the permuted video tokens, text suffix
        nv = N * U
        index = torch.cat([torch.arange(prefix), prefix + unit_permutation(grid), torch.arange(prefix + nv, L)])
        index = index.to(device=device, dtype=torch.int32)
    rows = torch.bincount(grp, weights=ln.double(), minlength=N + 1).clamp(min=1)  # query rows per group
    pairs = (grp[:, None] * (N + 1) + grp[None, :]).reshape(-1)
    return _MassTables(st, ln, index, grp.to(device), rows.to(device), pairs.to(device), segment_tables(st, ln, device))


@functools.lru_cache(maxsize=8)
def _drop_tables(candidates: tuple, grid: UnitGrid, device: torch.device) -> torch.Tensor:
    """``(C, G, G)`` bool on ``device``: the (query group, key group) pairs each candidate drops; shared by every
    site calibrated on the same grid and candidates (1 byte per entry: 30 MB at the Wan-14B grid)."""
    return keep_tables(list(candidates), grid).to(device) == 0


def _fold_table(grid: UnitGrid) -> torch.Tensor:
    """``(N+1, T+1)`` float64: unit -> frame (text -> text), the fold of unit mass to frame mass."""
    T = grid.num_frames
    fid = torch.cat([torch.arange(T).repeat_interleave(grid.units_per_frame), torch.tensor([T])])
    return torch.nn.functional.one_hot(fid, T + 1).double()


@functools.lru_cache(maxsize=16)
def _fold_on(grid: UnitGrid, device: torch.device) -> torch.Tensor:
    return _fold_table(grid).to(device)


def _to_cpu(*xs: torch.Tensor) -> list[torch.Tensor]:
    """``xs`` on the CPU as float64 with one copy (one synchronisation) when they live on another device."""
    if all(x.device.type == "cpu" for x in xs):
        return [x.double() for x in xs]
    dev = next(x.device for x in xs if x.device.type != "cpu")
    flat = torch.cat([x.to(device=dev, dtype=torch.float64).reshape(-1) for x in xs]).cpu()
    return [c.view(x.shape) for c, x in zip(flat.split([x.numel() for x in xs]), xs)]


def default_candidates(num_frames: int) -> list[TileMask]:
    """The frame tile family searched by default: ``g in 0..min(T,4)``, ``w in 0..min(T-1,2)``, plus dense.

    Masks that keep every tile at this ``T`` are dropped (``dense`` stands for them) and masks
    with the same frame pattern at this ``T`` are kept once, the one with the smallest ``g``
    then ``w``: it is the more conservative choice when the plan is applied at another ``T``.
    """
    return default_family_candidates(["tile"], UnitGrid.frames(num_frames, 1, 1))


def dedupe_candidates(candidates: Sequence[TileMask], num_frames: int) -> list[TileMask]:
    """Drop masks equal to another (earlier) one at ``num_frames``; all-kept masks become ``dense``."""
    return dedupe_unit_candidates(candidates, UnitGrid.frames(num_frames, 1, 1))


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


def _tiny(dtype: torch.dtype) -> float:
    """Below this a candidate's normaliser may hold denormal (imprecise) weights: ``1e-30`` in float32 keeps its
    largest kept weight >= ``1e-30 / L`` above float32's smallest normal (1.2e-38) for any ``L`` up to 1e8."""
    return 1e-30 if dtype == torch.float32 else 1e-290


def _own_max_weights(kr: torch.Tensor, m: torch.Tensor, l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group weights ``(B, H, C, r, G)`` of every candidate relative to the max over the groups it keeps, and its
    normaliser: exact whatever the gap to the dropped groups (one exp per entry: the rare path)."""
    mk = torch.where(kr.bool()[None, None], m[:, :, None], float("-inf"))  # (B,H,C,r,G)
    wk = torch.exp(mk - mk.amax(-1, keepdim=True))  # the query's own unit is always kept: the max is finite
    return wk, (wk * l[:, :, None]).sum(-1)


def _row_blocks(L: int, rows_per_block: int, pre: int, N: int, U: int, aligned: bool):
    """``(start, stop, whole_units)`` row blocks of a unit-ordered call: with ``aligned`` (every row, unit order) the
    video rows go in blocks of whole units (``whole_units`` True), the text rows before and after on their own."""
    if not aligned or U > rows_per_block:
        for start in range(0, L, rows_per_block):
            yield start, min(L, start + rows_per_block), False
        return
    step = rows_per_block // U * U
    for a, b, whole in ((0, pre, False), (pre, pre + N * U, True), (pre + N * U, L, False)):
        for start in range(a, b, step):
            yield start, min(b, start + step), whole


def _unit_block_errors(keep, qg, w_all, l, o, out_dense, U: int, acc) -> torch.Tensor | None:
    """Squared output errors ``(H, C)`` of every candidate on a block of whole query units, or ``None`` where a
    candidate's weights underflow (then the caller's exact own-max merge runs).

    Why: a candidate keeps the same key groups for every row of a query unit, so its merged output for the unit's
    ``U`` rows is ``keep[c, u] @ (w * o)`` over the groups: one matrix product per unit with ``U * D`` columns,
    instead of a ``(C, G) @ (G, D)`` product per row and a ``(B, H, C, r, G)`` weight table (the CPU calibration's
    largest cost at 4 x 4-token tiles, where a frame has 16 units of 16 rows)."""
    B, H, r, G = w_all.shape
    D, n = o.shape[-1], r // U
    ku = keep[:, qg[::U]].transpose(0, 1)  # (n, C, G): the keep row of each unit's queries
    lw = (w_all * l).view(B, H, n, U, G).transpose(-1, -2)  # (B, H, n, G, U)
    z_c = ku @ lw  # (B, H, n, C, U)
    if bool((z_c < _tiny(acc)).any()):
        return None
    wo = (w_all[..., None] * o).view(B, H, n, U, G, D).transpose(3, 4).reshape(B, H, n, G, U * D)
    out = (ku @ wo).view(B, H, n, -1, U, D).div_(z_c[..., None])
    out.sub_(out_dense.view(B, H, n, 1, U, D))
    return out.square_().sum((0, 2, 4, 5)).to(torch.float64)


@dataclass
class SiteResult:
    """Outcome of calibrating one site (over all observed steps, or one range of them).

    ``masks``/``errors``/``densities`` are per head (the chosen mask, its relative L2 error on
    the calibration data, its density under the site's layout).  ``frame_mass`` is
    ``(H, T+1, T+1)``: query group x key group, frames ``0..T-1`` then text at index ``T``.
    ``within_budget[h]`` is False when no candidate met the budget under ``max_density`` and
    the least-error one inside the density bound was taken instead (``notes`` says so).
    """

    masks: list[MaskSpec]
    errors: list[float]
    densities: list[float]
    frame_mass: torch.Tensor
    candidates: list[MaskSpec] = field(default_factory=list)
    candidate_errors: torch.Tensor | None = None  # (H, C)
    candidate_densities: list[float] = field(default_factory=list)
    within_budget: list[bool] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    observations: int = 0

    @property
    def density(self) -> float:
        return sum(self.densities) / len(self.densities) if self.densities else 1.0


class _StepStats:
    """Error accumulators of the calls at one timestep (exact: squared output error and norm; mass method:
    sum over query rows of the squared dropped mass, and the row count)."""

    __slots__ = ("calls", "err_sq", "norm_sq")

    def __init__(self, num_heads: int, num_candidates: int):
        self.err_sq = torch.zeros(num_heads, num_candidates, dtype=torch.float64)
        self.norm_sq = torch.zeros(num_heads, dtype=torch.float64)
        self.calls = 0


def _sums(steps: dict, keys, H: int, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    err = torch.zeros(H, C, dtype=torch.float64)
    norm = torch.zeros(H, dtype=torch.float64)
    for t in keys:
        s = steps.get(t)
        if s is not None:
            err += s.err_sq
            norm += s.norm_sq
    return err, norm


class SiteCalibrator:
    """Accumulates attention statistics of one site and picks per-head masks (see module doc).

    ``candidates``: the masks to score (``None``: every family in ``families`` with its default
    parameters, :mod:`.candidates`); ``tile_tokens``: the token tile's target size for window families
    (``None``: :func:`~vdit_compile.plans.default_tile`'s rule).  ``mass_kernel``: the block-statistics kernel
    on CUDA (:data:`~vdit_compile.kernels.block_stats_triton.DEFAULT_MASS_KERNEL`).
    """

    mass_kernel = DEFAULT_MASS_KERNEL

    def __init__(
        self,
        name: str,
        layout: TokenLayout,
        num_heads: int,
        candidates: Sequence[MaskSpec] | None = None,
        block_bytes: int | None = None,
        families: Iterable[str] = ("tile",),
        tile_tokens: int | None = None,
        method: str = "exact",
        verify_rows: int = 2048,
    ):
        if layout is None:
            raise ValueError(f"site {name!r}: a SiteCalibrator needs a TokenLayout, found None")
        if num_heads < 1:
            raise ValueError(f"site {name!r}: num_heads must be >= 1, found {num_heads}")
        if method not in ("exact", "mass", "auto"):
            raise ValueError(f"site {name!r}: method must be 'exact', 'mass' or 'auto', found {method!r}")
        self.name, self.layout, self.num_heads = name, layout, int(num_heads)
        self.method = method  # "auto": block mass statistics on CUDA, exact errors elsewhere (decided at the first call)
        self._verify: list[int] | None = None  # mass method, second pass: candidate indices scored exactly
        self.verify_rows = int(verify_rows)  # query rows per call the verification scores (evenly spaced)
        self._verified: dict[float | None, _StepStats] = {}
        self.step_ranges: list[list] | None = None  # set by calibration.run.prepare_verification
        families = tuple(families)
        self.grid = calibration_grid(layout, candidates, families, tile_tokens)
        self.candidates = (dedupe_unit_candidates(candidates, self.grid) if candidates is not None
                           else default_family_candidates(families, self.grid))
        self.block_bytes = block_bytes  # None: DEFAULT_BLOCK_BYTES of the inputs' device type
        T = self.grid.num_frames
        # frame-level mass (query frame, key frame; text last), folded from units at every call: O(H T^2) memory
        self._mass_sum = torch.zeros(num_heads, T + 1, T + 1, dtype=torch.float64)
        self._mass_count = torch.zeros(T + 1, dtype=torch.float64)
        self._fold = _fold_table(self.grid)  # (N+1, T+1): unit -> frame
        self._steps: dict[float | None, _StepStats] = {}
        self.observations = 0
        self._keep = keep_tables(self.candidates, self.grid)  # (C, G, G) float
        self._text_tokens: list[int] = []  # text tokens of every observed call (varies for dynamic layouts)

    # ------------------------------------------------------------------ accumulators (all steps)
    @property
    def _err_sq(self) -> torch.Tensor:
        return sum((s.err_sq for s in self._steps.values()), torch.zeros(self.num_heads, len(self.candidates),
                                                                          dtype=torch.float64))

    @property
    def _norm_sq(self) -> torch.Tensor:
        return sum((s.norm_sq for s in self._steps.values()), torch.zeros(self.num_heads, dtype=torch.float64))

    @property
    def timesteps(self) -> list:
        """Observed timesteps, high first (``None``, calls without one, last)."""
        known = sorted((t for t in self._steps if t is not None), reverse=True)
        return known + ([None] if None in self._steps else [])

    def step_calls(self, timestep) -> int:
        s = self._steps.get(timestep)
        return s.calls if s is not None else 0

    def _query_groups(self, lay: TokenLayout) -> torch.Tensor:
        N, U = self.grid.num_units, self.grid.unit_tokens
        return torch.cat([torch.full((lay.text_prefix,), N), torch.arange(N).repeat_interleave(U),
                          torch.full((lay.text_suffix,), N)])

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

    def _unit_order(self, x: torch.Tensor, lay: TokenLayout) -> torch.Tensor:
        """``x`` with its video tokens permuted into unit order (a no-op on whole-frame units of frame-major tokens)."""
        if self.grid.in_unit_order:
            return x
        pre, nv = lay.text_prefix, lay.video_tokens
        perm = unit_permutation(self.grid, x.device)
        return torch.cat([x[:, :, :pre], x[:, :, pre:pre + nv][:, :, perm], x[:, :, pre + nv:]], dim=2)

    def check_call(self, q, k, v, padding_cut: bool = False) -> TokenLayout:
        """Validate one call's ``q, k, v`` and return its layout (clear errors otherwise)."""
        if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
            raise ValueError(
                f"site {self.name!r}: observe expects q, k, v of shape (B, H, L, D) with equal B, H, L; "
                f"found q{tuple(q.shape)}, k{tuple(k.shape)}, v{tuple(v.shape)}"
            )
        _, H, L, _ = q.shape
        if H != self.num_heads:
            raise ValueError(f"site {self.name!r}: calibrator was built for {self.num_heads} heads, observed {H}")
        lay = self._call_layout(L, padding_cut)
        if lay is None:
            raise ValueError(
                f"site {self.name!r}: observed a sequence of {L} tokens but calibration started with the layout "
                f"{self.layout.describe()} ({self.layout.seq_len} tokens); calibrate at one frame count and "
                "resolution (a plan made at T frames applies at other frame counts, see docs/calibration.md)"
            )
        return lay

    def observe(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                padding_cut: bool = False, timestep: float | None = None) -> None:
        """Accumulate statistics of one call; ``q, k, v`` are ``(B, H, L, D)`` on any device/dtype.

        ``padding_cut``: the call's padded text tokens at the end of the sequence were cut off (only
        its valid tokens are given), so a fixed text suffix may hold fewer tokens than the layout's.
        ``timestep``: the call's denoising timestep (step-aware plans choose masks per range of them).
        """
        lay = self.check_call(q, k, v, padding_cut)
        B, _, L, D = q.shape
        scale = float(scale) if scale is not None else D ** -0.5
        if self.method == "auto":
            self.method = "mass" if q.is_cuda else "exact"
        key = None if timestep is None else float(timestep)
        if self.method == "mass" and self._verify is None:
            err, norm, mass = self._mass_pass(q, k, lay, scale)  # reads q, k in place (no unit-order copy)
        else:
            q, k, v = (self._unit_order(x, lay) for x in (q, k, v))
        if self._verify is not None:  # second pass of the mass method: exact errors of the candidates to verify
            rows = None
            if L > self.verify_rows:  # evenly spaced query rows: every unit's share, unbiased sums of both terms
                rows = torch.linspace(0, L - 1, self.verify_rows).round().long().unique()
            err, norm, _ = self._exact_pass(q, k, v, lay, scale, self._verify, rows)
            st = self._verified.setdefault(key, _StepStats(self.num_heads, len(self._verify)))
            st.err_sq += err.cpu()
            st.norm_sq += norm.cpu()
            st.calls += 1
            return
        if self.method != "mass":
            err, norm, mass = self._exact_pass(q, k, v, lay, scale, None)
        qgroup_cpu = self._query_groups(lay)
        fold = self._fold if mass.device.type == "cpu" else _fold_on(self.grid, mass.device)
        fold = fold.to(mass.dtype)  # the mass path's (H, G, G) stays float32 (a float64 copy was 2x its memory)
        folded = torch.einsum("hij,ia,jb->hab", mass, fold, fold)  # (H, T+1, T+1), on the call's device
        err, folded, norm = _to_cpu(err, folded, norm)  # one device -> host copy per call
        self._mass_sum += folded
        self._mass_count += (torch.bincount(qgroup_cpu, minlength=self.grid.num_units + 1).double() * B) @ self._fold
        self._text_tokens.append(lay.text_prefix + lay.text_suffix)
        st = self._steps.get(key)
        if st is None:
            st = self._steps[key] = _StepStats(self.num_heads, len(self.candidates))
        st.err_sq += err
        st.norm_sq += norm
        st.calls += 1
        self.observations += 1

    def _mass_pass(self, q, k, lay: TokenLayout, scale: float):
        """Block mass statistics of one call (Triton on CUDA): ``(H, C)`` squared dropped mass summed over rows,
        ``(H,)`` row count and ``(H, G, G)`` group mass.  Within a query unit the rows are taken to drop
        equal mass (the row-wise square is not known from block sums; Jensen: this is a lower bound).

        Everything after the kernel stays on ``q``'s device: the segment tables, unit order and the candidates'
        drop tables come from per-device caches (:func:`_mass_tables`, :func:`_drop_tables`), every candidate is
        scored by one batched contraction per chunk over the group-mass matrix, and nothing is synchronised."""
        from ..kernels.block_stats_triton import block_mass

        B, H, L, _ = q.shape
        t = _mass_tables(self.grid, lay.text_prefix, lay.text_suffix, L, q.device)
        seg = block_mass(q, k, scale, t.starts, t.lens, t.index, kernel=self.mass_kernel,
                         tables=t.kernel_tables)  # (B, H, S, S) float32
        G = self.grid.num_units + 1
        # segments -> groups in one index_add (no (S, G) intermediate), then the kernel's output is let go: with the
        # small score chunks this keeps the pass's extra memory near two group-mass matrices (wan14b: 61 MiB each)
        mass = torch.zeros(B, H, G * G, device=seg.device).index_add_(2, t.pairs, seg.reshape(B, H, -1)).view(B, H, G, G)
        del seg
        drop = _drop_tables(tuple(self.candidates), self.grid, q.device)  # (C, G, G) bool: dropped pairs
        C = drop.shape[0]
        step = max(1, _SCORE_CHUNK_BYTES // (4 * G * G))
        err = torch.empty(H, C, dtype=torch.float64, device=mass.device)
        for c0 in range(0, C, step):  # one chunk at wan14b-size grids and below a few hundred units: one launch
            dropped = torch.einsum("bhij,cij->bhci", mass, drop[c0:c0 + step].float()).double()  # (B, H, c, G)
            err[:, c0:c0 + step] = (dropped.square_() / t.rows).sum((0, 3))
        norm = torch.full((H,), float(B * L), dtype=torch.float64)
        return err, norm, mass[0] if B == 1 else mass.sum(0)  # float32: observe folds it to frames before float64

    def _exact_pass(self, q, k, v, lay: TokenLayout, scale: float, subset: list[int] | None,
                    rows: torch.Tensor | None = None):
        """Exact squared output errors ``(H, C')`` of the candidates (``subset``: their indices; None: all),
        the dense output's squared norm ``(H,)`` and the group mass ``(H, G, G)`` of one unit-ordered call
        (``rows``: only these query rows, unit order)."""
        B, H, L, D = q.shape
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        dev = q.device
        qgroup_cpu = self._query_groups(lay)
        N, U, pre, suf = self.grid.num_units, self.grid.unit_tokens, lay.text_prefix, lay.text_suffix
        kf, vf = k.to(acc), v.to(acc)
        k_vid = kf[:, :, pre : pre + N * U]
        v_vid = vf[:, :, pre : pre + N * U].reshape(B, H, N, U, -1)
        text_idx = torch.cat([torch.arange(pre), torch.arange(L - suf, L)]).to(dev)
        k_txt, v_txt = kf[:, :, text_idx], vf[:, :, text_idx]
        keep = (self._keep if subset is None else self._keep[subset]).to(device=dev, dtype=acc)
        if rows is not None:
            q, qgroup_cpu = q[:, :, rows.to(dev)], qgroup_cpu[rows]
        qgroup = qgroup_cpu.to(dev)
        Lq = q.shape[2]
        C, G = keep.shape[0], N + 1
        budget = self.block_bytes or DEFAULT_BLOCK_BYTES.get(dev.type, DEFAULT_BLOCK_BYTES["cuda"])
        # scores + exp (+ a temporary), per-group partials, candidate outputs and their differences
        per_row = B * H * (3 * L + 2 * G * D + C * (2 * D + 2 * G)) * torch.finfo(acc).bits // 8
        rows_per_block = max(1, min(L, budget // per_row))
        err = torch.zeros(H, C, dtype=torch.float64, device=dev)
        norm = torch.zeros(H, dtype=torch.float64, device=dev)
        mass = torch.zeros(H, G, G, dtype=torch.float64, device=dev)
        for start, stop, whole_units in _row_blocks(Lq, rows_per_block, pre, N, U, rows is None):
            qb = q[:, :, start:stop].to(acc)
            m, l, o = _group_partials(qb, k_vid, v_vid, k_txt, v_txt, scale, N, U)
            qg = qgroup[start:stop]
            # dense: merge all groups
            m_all = m.amax(-1, keepdim=True)
            w_all = torch.exp(m - m_all)  # (B,H,r,G); -inf groups -> 0
            z_all = (w_all * l).sum(-1)
            group_mass = w_all * l / z_all[..., None]
            out_dense = torch.einsum("bhrg,bhrgd->bhrd", w_all, o) / z_all[..., None]
            mass.index_add_(1, qg, group_mass.sum(0).to(torch.float64))
            norm += out_dense.square().sum((0, 2, 3)).to(torch.float64)
            if whole_units:  # rows of whole query units: one (C x G) @ (G x U*D) product per unit, no (C, r, G) table
                e = _unit_block_errors(keep, qg, w_all, l, o, out_dense, U, acc)
                if e is not None:
                    err += e
                    continue
            # candidates: keep table rows of each query's group -> (C, r, G), merged with the dense weights
            kr = keep[:, qg]
            wk = kr[None, None] * w_all[:, :, None]  # (B,H,C,r,G): a product where an exp per entry was
            z_c = (wk * l[:, :, None]).sum(-1)
            if bool((z_c < _tiny(acc)).any()):  # on CUDA (the mass method's verification) one sync per row block
                # a candidate whose kept scores are all far below the dropped ones: its weights underflowed
                # against the dense max, so this block merges relative to each candidate's own max (exact)
                wk, z_c = _own_max_weights(kr, m, l)
            out_c = torch.einsum("bhcrg,bhrgd->bhcrd", wk, o).div_(z_c[..., None]).sub_(out_dense[:, :, None])
            err += out_c.square_().sum((0, 3, 4)).to(torch.float64)
        return err, norm, mass

    # ------------------------------------------------------------------ results
    def frame_mass(self) -> torch.Tensor:
        """Mean attention mass ``(H, T+1, T+1)`` [query frame, key frame]; text is index ``T``."""
        count = self._mass_count.clamp(min=1)
        return (self._mass_sum / count[None, :, None]).float()

    def candidate_errors(self, timesteps: Iterable | None = None, verified: bool = True) -> torch.Tensor:
        """Relative L2 error ``(H, C)`` of every candidate against dense over the calls at ``timesteps``
        (``None``: all observed data).

        Mass method: the estimate (root mean square of the mass a row drops, docs/calibration.md); once a
        verification pass ran (``verified``), the verified candidates carry their exact error and the others
        ``inf`` (never chosen unverified)."""
        err, norm = self.error_sums(timesteps, verified)
        return (err / norm.clamp(min=1e-300)[:, None]).sqrt()

    def error_sums(self, timesteps: Iterable | None = None, verified: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The two sums of :meth:`candidate_errors` over the calls at ``timesteps``: squared output error
        ``(H, C)`` (``inf`` for candidates a verification pass did not score) and the dense output's squared
        norm ``(H,)``.  Sums over disjoint sets of calls add up (step ranges, :mod:`.steps`)."""
        keys = list(self._steps) if timesteps is None else list(timesteps)
        H, C = self.num_heads, len(self.candidates)
        err, norm = _sums(self._steps, keys, H, C)
        if not verified or not self._verified:
            return err, norm
        v_err, v_norm = _sums(self._verified, keys, H, len(self._verify))
        out = torch.full_like(err, float("inf"))
        out[:, self._verify] = v_err
        return out, v_norm

    # ------------------------------------------------------------------ verification (mass method)
    @property
    def needs_verification(self) -> bool:
        return self.method == "mass" and self.observations > 0 and not self._verified

    def begin_verify(self, error_budget: float, max_density: float | None, ranges: list[list] | None,
                     fallbacks: int = 3, slack: float = 2.5, sparse: int = 6, every: bool = True) -> list[int]:
        """Switch to the verification pass, whose calls score candidates with their real output error (on
        ``verify_rows`` evenly spaced query rows per call).

        ``every`` (the default): every candidate within ``max_density``, and ``dense``.  The block-mass estimate
        ranks candidates too loosely to pre-select them (real / estimate: median 0.40, 10th-90th percentile
        0.17-0.75, correlation 0.54 on the embedded model; a pre-selection of a few candidates gave plans 0.1-0.25
        denser than the exact statistics at the same budget, docs/calibration.md), while scoring all of them
        costs little more than scoring a few: the pass's cost is the row block's scores against every key, and
        each further candidate only adds a merge of the per-group partials.
        ``every=False``: per head (and step range) the estimate's choice and the next ``fallbacks`` denser
        candidates feasible by the estimate, the ``sparse`` sparsest candidates whose estimate is within ``slack``
        times the budget, and ``dense``."""
        dens = self.candidate_densities()
        dense_idx = [c for c, m in enumerate(self.candidates) if m.dense]
        chosen: set[int] = set(dense_idx)
        in_bound = [c for c, ok in enumerate(within_density(dens, max_density)) if ok]
        if every:
            chosen.update(in_bound)
        for r in ([] if every else (ranges or [None])):
            errs = self.candidate_errors(r, verified=False)
            for h in range(self.num_heads):
                by_density = sorted(in_bound, key=lambda c: (dens[c], c))
                strict = [c for c in by_density if errs[h, c] <= error_budget]
                loose = [c for c in by_density if errs[h, c] <= error_budget * slack]
                chosen.update(strict[: 1 + fallbacks])
                chosen.update(loose[:sparse])
        self._verify = sorted(chosen)
        self._verified = {}
        self.step_ranges = ranges
        return self._verify

    def density_layout(self) -> TokenLayout:
        """The layout densities are reported for: for a per-call text length, the mean observed one."""
        if not self.layout.is_dynamic:
            return self.layout
        n = round(sum(self._text_tokens) / len(self._text_tokens)) if self._text_tokens else 0
        return self.layout.resolve(self.layout.static_tokens + n)

    def candidate_densities(self) -> list[float]:
        lay = self.density_layout()
        return [masks_density([m], lay, self.grid) for m in self.candidates]

    def choose(self, errs: torch.Tensor, dens: Sequence[float], error_budget: float,
               max_density: float | None = None) -> tuple[list[int], list[str]]:
        """Per head, the index of the sparsest candidate with error <= budget (and density <= bound), and a
        note ("" when within budget).  See :meth:`result`."""
        if error_budget < 0:
            raise ValueError(f"error_budget must be >= 0, found {error_budget}")
        picks, notes = [], []
        order = range(len(self.candidates))
        bound = "" if max_density is None else f" at density <= {max_density:g}"
        in_bound = [c for c, ok in zip(order, within_density(dens, max_density)) if ok]
        for h in range(self.num_heads):
            e = errs[h].tolist()
            feasible = [c for c in in_bound if e[c] <= error_budget]
            if feasible:
                best = min(feasible, key=lambda c: (dens[c], e[c], c))
                note = ""
            elif in_bound:
                best = min(in_bound, key=lambda c: (e[c], dens[c], c))
                note = (f"no mask within error {error_budget:g}{bound}; "
                        f"took least-error {self.candidates[best].name} (error {e[best]:.4g})")
            else:
                best = min(order, key=lambda c: (dens[c], e[c], c))
                note = (f"no mask reaches density <= {max_density:g}; took sparsest "
                        f"{self.candidates[best].name} (density {dens[best]:.4g}, error {e[best]:.4g})")
            picks.append(best)
            notes.append(note)
        return picks, notes

    def result(self, error_budget: float, max_density: float | None = None,
               timesteps: Iterable | None = None, picks: Sequence[int] | None = None) -> SiteResult:
        """Choose per head the sparsest candidate with error <= ``error_budget`` (and density <= ``max_density``)
        on the calls at ``timesteps`` (``None``: every observed call).

        Ties in density go to the lower error, then to the earlier candidate (frame-level families first,
        smaller parameters first).  When nothing fits, the least-error candidate within ``max_density`` is
        taken (or the sparsest candidate when even that bound cannot be met) and the head is reported as
        over budget.  ``picks`` (a candidate index per head) overrides the choice: the masks of a step range
        allocated with the other ranges (:func:`~.steps.allocate_ranges`); notes still say which heads have no
        candidate within the budget on these calls.
        """
        if self.observations == 0:
            raise RuntimeError(f"site {self.name!r}: no calibration data was observed")
        errs = self.candidate_errors(timesteps)
        dens = self.candidate_densities()
        own, notes = self.choose(errs, dens, error_budget, max_density)
        picks = own if picks is None else list(picks)
        obs = self.observations if timesteps is None else sum(self.step_calls(t) for t in timesteps)
        return SiteResult([self.candidates[c] for c in picks], [float(errs[h, c]) for h, c in enumerate(picks)],
                          [float(dens[c]) for c in picks], self.frame_mass(), list(self.candidates), errs.float(),
                          dens, [not n for n in notes], notes, obs)
