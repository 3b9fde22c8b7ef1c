"""Block visit lists for tile-sparse attention, built vectorised in milliseconds and cached.

The kernels tile the ``Lq x Lk`` score matrix into ``block_rows x block_cols`` blocks of
*tokens* (not frames: ``P`` is rarely a multiple of the block size).  For every row block
(a query block in the forward and the ``dq`` pass, a key block in the ``dk/dv`` pass) a
CSR row lists the column blocks that hold at least one kept entry, the fully kept ones
first (the kernel runs them without any element mask) and then the ones that straddle a
frame/text boundary or the sequence end (``needs_mask``; the kernel masks those element
by element).  Empty blocks are never visited.

How a block is classified, without touching ``L x L`` elements: tokens are grouped in
*segments* -- ``0`` text prefix, ``1..T`` frames, ``T+1`` text suffix -- so that a block
covers a contiguous segment range ``[lo, hi]``.  With the extended mask ``E`` (the
``(T+2) x (T+2)`` frame mask with all-true text rows/columns) and its summed-area table,
the kept segment pairs of a block pair are counted in O(1): ``> 0`` means visit,
``== area`` means fully kept.  Everything is ``(patterns, row blocks, column blocks)``
tensor arithmetic on the inputs' device (GPU or CPU), so a build takes milliseconds even
at 120k tokens, and it is cached per (layouts, mask, block sizes, device).

Heads that share a mask share one *pattern*; ``head_pattern[h]`` selects it.

Padded units (:mod:`.padding`): a :class:`Side` may say that only the first ``frame_valid`` of every
``frame_tokens`` tokens of a unit are real.  A block of pad alone, on either side, is never visited (its keys
never attend, its query rows are discarded).  A fully kept block whose keys include pad is a *pad tail*: in the
query-major lists (forward, ``dq``) it sits at the end of the row's unmasked entries (``num_pad_tail`` of them)
and the kernels drop its pad keys with one column predicate instead of the segment lookup; in the key-major
``dk/dv`` lists it is simply unmasked (the pad keys' own gradients are computed and never read back).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Side:
    """Token layout of one side (queries or keys): ``pre`` text, ``T x P`` video, the rest text."""

    length: int
    text_prefix: int
    num_frames: int
    frame_tokens: int  # the stride of a frame / unit
    frame_valid: int = 0  # real tokens at the start of each frame (0: all ``frame_tokens``); the rest is pad

    def __post_init__(self):
        if self.num_frames < 1 or self.frame_tokens < 1 or self.text_prefix < 0:
            raise ValueError(f"invalid side layout {self}")
        if not 0 <= self.frame_valid <= self.frame_tokens:
            raise ValueError(f"invalid side layout {self}: frame_valid must be in 0..frame_tokens")
        if self.text_prefix + self.num_frames * self.frame_tokens > self.length:
            raise ValueError(
                f"layout of {self.text_prefix} prefix + {self.num_frames}x{self.frame_tokens} video tokens "
                f"does not fit a sequence of {self.length}"
            )

    @property
    def video_end(self) -> int:
        return self.text_prefix + self.num_frames * self.frame_tokens

    @property
    def num_segments(self) -> int:
        return self.num_frames + 2

    @property
    def valid_tokens(self) -> int:
        """Real tokens per frame (``frame_tokens`` unless padded)."""
        return self.frame_valid or self.frame_tokens

    @property
    def padded(self) -> bool:
        return self.valid_tokens < self.frame_tokens

    def pad_before(self, tokens: torch.Tensor) -> torch.Tensor:
        """Number of pad tokens among token indices ``[0, tokens)`` (pad sits at the end of every frame)."""
        P, V = self.frame_tokens, self.valid_tokens
        rel = (tokens - self.text_prefix).clamp(0, self.num_frames * P)
        return torch.div(rel, P, rounding_mode="floor") * (P - V) + (rel % P - V).clamp(min=0)

    def block_pad(self, block: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per block: whether it holds any pad token, and whether it holds nothing else."""
        n = -(-self.length // block)
        first = torch.arange(n, device=device) * block
        end = torch.clamp(first + block, max=self.length)
        npad = self.pad_before(end) - self.pad_before(first)
        return npad > 0, npad == end - first

    @classmethod
    def of(cls, layout) -> "Side":
        """From a :class:`~vdit_compile.layout.TokenLayout`."""
        return cls(layout.seq_len, layout.text_prefix, layout.num_frames, layout.frame_tokens)

    def segments(self, tokens: torch.Tensor) -> torch.Tensor:
        """Segment id of each token index: 0 prefix text, 1..T frames, T+1 suffix text (and past the end)."""
        frame = torch.div(tokens - self.text_prefix, self.frame_tokens, rounding_mode="floor") + 1
        frame = torch.where(tokens < self.text_prefix, torch.zeros_like(frame), frame)
        return torch.where(tokens >= self.video_end, torch.full_like(frame, self.num_frames + 1), frame)

    def block_ranges(self, block: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per block: first segment, last segment, and whether the block runs past the sequence end."""
        n = -(-self.length // block)
        first = torch.arange(n, device=device) * block
        last = torch.clamp(first + block, max=self.length) - 1
        return self.segments(first), self.segments(last), (first + block) > self.length


@dataclass
class VisitList:
    """CSR visit lists: row ``r`` of pattern ``p`` is ``p * n_rows + r``.

    ``cols[offsets[i]:offsets[i] + num_unmasked[i]]`` are fully kept blocks, the rest of the
    row up to ``offsets[i + 1]`` need element masking (``needs_mask`` says the same per
    entry).  ``row_order[p]`` lists pattern ``p``'s rows by decreasing work, so heavy rows
    (text rows, global frames) start first and do not form a tail.
    """

    offsets: torch.Tensor  # int32 (patterns * n_rows + 1,)
    num_unmasked: torch.Tensor  # int32 (patterns * n_rows,)
    cols: torch.Tensor  # int32 (nnz,)
    needs_mask: torch.Tensor  # bool (nnz,)
    row_order: torch.Tensor  # int32 (patterns, n_rows)
    n_rows: int
    n_cols: int
    block_rows: int
    block_cols: int
    #: int32 (patterns * n_rows,): the last this many of a row's unmasked entries are pad tails (padded units)
    num_pad_tail: torch.Tensor | None = None

    @property
    def num_visits(self) -> int:
        return int(self.cols.numel())

    def counts(self) -> torch.Tensor:
        """Visited blocks per row, ``(patterns, n_rows)``."""
        return (self.offsets[1:] - self.offsets[:-1]).view(-1, self.n_rows)


def extended_masks(frame_mask: torch.Tensor) -> torch.Tensor:
    """``(Hp, Tq, Tk)`` bool -> ``(Hp, Tq+2, Tk+2)`` int8 with all-true text rows and columns."""
    hp, tq, tk = frame_mask.shape
    e = torch.ones(hp, tq + 2, tk + 2, dtype=torch.int8, device=frame_mask.device)
    e[:, 1 : tq + 1, 1 : tk + 1] = frame_mask.to(torch.int8)
    return e


def block_classes(ext: torch.Tensor, qside: Side, kside: Side, block_q: int, block_k: int):
    """``(keep, partial)`` bool ``(Hp, nQ, nK)``: block visited / visited with an element mask."""
    dev = ext.device
    sat = torch.zeros(ext.shape[0], ext.shape[1] + 1, ext.shape[2] + 1, dtype=torch.int32, device=dev)
    sat[:, 1:, 1:] = ext.to(torch.int32).cumsum(1).cumsum(2)
    qlo, qhi, qoob = qside.block_ranges(block_q, dev)
    klo, khi, koob = kside.block_ranges(block_k, dev)
    a, b = (qhi + 1)[:, None], (khi + 1)[None, :]
    c, d = qlo[:, None], klo[None, :]
    count = sat[:, a, b] - sat[:, c, b] - sat[:, a, d] + sat[:, c, d]
    area = ((qhi - qlo + 1)[:, None] * (khi - klo + 1)[None, :]).to(torch.int32)
    keep = count > 0
    partial = keep & ((count < area) | qoob[:, None] | koob[None, :])
    if qside.padded or kside.padded:  # padded units: blocks of pad alone are skipped (pad tails: see pad_tails)
        _, q_all_pad = qside.block_pad(block_q, dev)
        _, k_all_pad = kside.block_pad(block_k, dev)
        keep = keep & ~q_all_pad[:, None] & ~k_all_pad[None, :]
        partial = partial & keep
    return keep, partial


def pad_tails(keep: torch.Tensor, partial: torch.Tensor, kside: Side, block_k: int) -> torch.Tensor | None:
    """``(Hp, nQ, nK)`` bool: visited, unmasked blocks whose keys include pad (``None`` when keys are not padded)."""
    if not kside.padded:
        return None
    k_any_pad, _ = kside.block_pad(block_k, keep.device)
    return keep & ~partial & k_any_pad[None, None, :]



def csr_from_blocks(keep: torch.Tensor, partial: torch.Tensor, block_rows: int, block_cols: int,
                    tail: torch.Tensor | None = None) -> VisitList:
    """Pack ``(Hp, R, C)`` block classes into CSR rows, unmasked entries first (pad ``tail`` ones last of those).

    One ``nonzero`` over ``[fully kept | pad tails | partial]`` laid side by side (``R x 3C`` per pattern) yields
    every row's entries already in CSR order, so no scatter or sort is needed.  Why: on the GPU each op costs a
    launch and ``nonzero`` a host sync, and the build time (BENCHMARKS.md: up to 16.6 ms for all three lists with
    two ``nonzero`` per list) follows the op count.
    """
    hp, R, C = keep.shape
    dev = keep.device
    tail = torch.zeros_like(keep) if tail is None else tail
    both = torch.cat(((keep & ~partial & ~tail), tail, partial), dim=2).reshape(hp * R, 3 * C)
    idx = both.nonzero(as_tuple=True)[1]
    per_row = both.sum(1)
    offsets = torch.zeros(hp * R + 1, dtype=torch.int32, device=dev)
    offsets[1:] = per_row.cumsum(0)
    nfull = both[:, :2 * C].sum(1, dtype=torch.int32)
    ntail = both[:, C:2 * C].sum(1, dtype=torch.int32)
    needs = idx >= 2 * C
    cols = (idx % C).to(torch.int32)
    order = torch.argsort(per_row.view(hp, R), dim=1, descending=True, stable=True).to(torch.int32)
    return VisitList(offsets, nfull, cols, needs, order.contiguous(), R, C, block_rows, block_cols, ntail)


@dataclass
class TilePlan:
    """Everything the kernels need for one (query layout, key layout, per-head mask) on one device.

    Visit lists are built lazily per block shape (forward, ``dq`` and the transposed ``dk/dv``
    lists use different tiles) and kept here, so a cached plan serves every later call.
    """

    qside: Side
    kside: Side
    head_pattern: torch.Tensor  # int32 (H,)
    ext: torch.Tensor  # int8 (Hp, Tq+2, Tk+2)
    _lists: dict = field(default_factory=dict)
    _max_kept: float | None = None

    @property
    def num_patterns(self) -> int:
        return int(self.ext.shape[0])

    def visits(self, block_q: int, block_k: int, transposed: bool = False) -> VisitList:
        """Query-major lists (``transposed=False``) or key-major lists for the ``dk/dv`` pass."""
        key = (block_q, block_k, transposed)
        if key not in self._lists:
            keep, partial = block_classes(self.ext, self.qside, self.kside, block_q, block_k)
            if transposed:  # dk/dv: a pad tail runs unmasked (the pad keys are the row's own, their grads unread)
                self._lists[key] = csr_from_blocks(keep.transpose(1, 2), partial.transpose(1, 2), block_k, block_q)
            else:
                tail = pad_tails(keep, partial, self.kside, block_k)
                self._lists[key] = csr_from_blocks(keep, partial, block_q, block_k, tail)
        return self._lists[key]

    def max_kept(self) -> float:
        """Largest per-head kept fraction, computed once per plan (the launcher's path choice reads it per call)."""
        if self._max_kept is None:
            self._max_kept = float(self.kept_fraction().max())
        return self._max_kept

    def kept_fraction(self) -> torch.Tensor:
        """Exact kept fraction of ``Lq x Lk`` per head (text included; pad tokens count as never kept), for FLOP
        counting."""
        def seg_sizes(s: Side):
            sizes = torch.full((s.num_segments,), s.valid_tokens, dtype=torch.float64)
            sizes[0], sizes[-1] = s.text_prefix, s.length - s.video_end
            return sizes

        sq, sk = seg_sizes(self.qside), seg_sizes(self.kside)
        kept = torch.einsum("pij,i,j->p", self.ext.cpu().double(), sq, sk)
        return (kept / (self.qside.length * self.kside.length))[self.head_pattern.cpu().long()]


_CACHE: "OrderedDict[tuple, TilePlan]" = OrderedDict()
_CACHE_SIZE = 64


def _mask_key(frame_mask: torch.Tensor) -> tuple:
    m = frame_mask.detach().to("cpu", torch.bool).contiguous()
    return tuple(m.shape), m.numpy().tobytes()


def tile_plan(qside: Side, kside: Side, frame_mask, num_heads: int, device, key=None) -> TilePlan:
    """Cached :class:`TilePlan` for a ``(H or 1, Tq, Tk)`` bool frame mask.

    ``key`` lets callers that already have a cheap hashable description of the mask (the
    op's integer arguments) skip hashing the mask tensor; ``frame_mask`` may then be a
    zero-argument callable, only evaluated on a cache miss.
    """
    device = torch.device(device)
    if key is not None:
        plan = _CACHE.get((qside, kside, num_heads, str(device), key))
        if plan is not None:
            _CACHE.move_to_end((qside, kside, num_heads, str(device), key))
            return plan
    if callable(frame_mask):
        frame_mask = frame_mask()
    if frame_mask.dim() == 2:
        frame_mask = frame_mask[None]
    if frame_mask.dim() != 3 or frame_mask.shape[1:] != (qside.num_frames, kside.num_frames):
        raise ValueError(
            f"frame mask must be (H or 1, {qside.num_frames}, {kside.num_frames}) bool, found {tuple(frame_mask.shape)}"
        )
    if frame_mask.shape[0] not in (1, num_heads):
        raise ValueError(f"frame mask has {frame_mask.shape[0]} heads, expected 1 or {num_heads}")
    ckey = (qside, kside, num_heads, str(device), key if key is not None else _mask_key(frame_mask))
    plan = _CACHE.get(ckey)
    if plan is not None:
        _CACHE.move_to_end(ckey)
        return plan
    fm = frame_mask.detach().to("cpu", torch.bool).expand(num_heads, -1, -1)
    patterns, inverse = torch.unique(fm.reshape(num_heads, -1), dim=0, return_inverse=True)
    patterns = patterns.view(-1, qside.num_frames, kside.num_frames)
    plan = TilePlan(qside, kside, inverse.to(torch.int32).to(device), extended_masks(patterns.to(device)))
    _CACHE[ckey] = plan
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return plan


def clear_cache() -> None:
    _CACHE.clear()
