"""Detection pass: find, name and classify every attention site of a graph and infer its layout.

Classification uses the token grid of the call (:mod:`.grid`) and the q/k shapes:

* ``video_self``: queries and keys are exactly the ``T'*H'*W'`` video tokens;
* ``joint_text_prefix`` / ``joint_text_suffix``: video plus other tokens; where those sit is
  read from the dataflow graph, never guessed: walking back from ``q`` (networkx over the FX
  nodes) to the ``cat`` that builds the sequence, the piece holding exactly the video tokens
  splits it into a prefix (CogVideoX) and a suffix (HunyuanVideo) (:mod:`.split`).  Models that
  trim padded text by value (Mochi, HunyuanVideo 1.5, Framepack) have a symbolic sequence
  length: the same trace gives a fixed video piece and a symbolic text side, which becomes the
  layout's ``dynamic_text`` (the op reads its length from the sequence at each call);
* ``cross``: queries and keys of different lengths (video queries on text keys);
* ``spatial`` / ``temporal``: one frame's ``H'*W'`` tokens per batch row, or ``T'`` tokens
  per pixel (Latte, ``TransformerTemporalModel``): not 3D, left alone;
* ``other``: anything else (text refiners, audio, pooling).

A 3D site whose layout cannot be established (unknown grid, untraceable split, attention
mask other than text padding, dropout, GQA, symbolic text on both sides) gets ``layout=None``
and a reason: it stays dense.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import networkx as nx
import torch
import torch.fx

from ..kinds import TILEABLE_KINDS, SiteKind
from ..layout import TokenLayout
from .attention import AttnMatch, example_shape, find_attention
from .grid import GridInfo
from .naming import RootNames, local_module_path, param_placeholders, rebase, strip_self
from .probe import select_grid
from .registry import register_pass
from .split import known_equal, static_int, trace_sequence_split


@dataclass
class AttentionSite:
    """One attention site: stable module-path name, kind, token layout (or ``None``) and why."""

    name: str
    kind: SiteKind | str  # a SiteKind (plain strings from older callers compare equal)
    layout: TokenLayout | None
    num_heads: int
    head_dim: int
    reason: str = ""
    form: str = "sdpa"
    video: bool = False  # 3D attention over the video whose layout is unknown (kind ``other``): see Classification

    @property
    def tileable(self) -> bool:
        return self.kind in TILEABLE_KINDS and self.layout is not None

    @property
    def dense_3d(self) -> bool:
        """A 3D (video self / joint) attention site that cannot be tiled: the user is warned it stays dense."""
        return self.layout is None and (self.kind in TILEABLE_KINDS or self.video)

    def describe(self) -> str:
        lay = self.layout.describe() if self.layout is not None else "-"
        return f"{self.name}: {self.kind} {lay} heads={self.num_heads}x{self.head_dim}" + (f" ({self.reason})" if self.reason else "")


@dataclass
class SiteTemplate:
    """A site as found in one graph; ``shared`` graphs (a block's frame) resolve names at run time."""

    site: AttentionSite
    match: AttnMatch
    local_path: str
    anchor: torch.fx.Node | None = None  # a parameter input of the site's module
    anchor_local: str | None = None
    shared: bool = False
    merged_heads: bool = False  # q is (B*H, L, D): viewed as (B*H, 1, L, D)
    alias: str = "self"  # how the compiled frame names the module whose root path prefixes the site
    notes: list[str] = field(default_factory=list)


def dataflow_graph(gm: torch.fx.GraphModule) -> nx.DiGraph:
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        g.add_node(n)
        for inp in n.all_input_nodes:
            g.add_edge(inp, n)
    return g


def is_padding_mask(mask, seq_len, square: bool = True) -> bool:
    """A ``(B|1, 1, 1, L)`` (or, with ``square``, ``(B|1, 1, L, L)``) mask: text padding, checked at run time.

    HunyuanVideo's ``(B,1,1,L)`` key-padding mask and HunyuanVideo 1.5's ``(B,1,L,L)`` outer
    product of the valid-token mask; ``hooks.apply_shared`` verifies the values per call
    (:mod:`vdit_compile.runtime.padding`): padding at the end runs the op on the valid tokens,
    any other mask runs dense masked attention with a warning.
    """
    ms = example_shape(mask)
    return (ms is not None and len(ms) == 4 and known_equal(ms[1], 1) and known_equal(ms[3], seq_len)
            and (known_equal(ms[2], 1) or square and known_equal(ms[2], seq_len)))


is_key_padding_mask = is_padding_mask  # the earlier name


@dataclass(frozen=True)
class Classification:
    """What :func:`classify` found for one match: kind, token layout (``None``: left dense) and why.

    ``video`` marks a site that attends over the video grid in 3D although its layout could not be
    established (kind ``other``): the user is warned that it stays dense (:func:`~vdit_compile.capture.backend.is_dense_3d`).
    """

    kind: SiteKind
    layout: TokenLayout | None = None
    reason: str = ""
    heads: int = 0
    head_dim: int = 0
    merged: bool = False  # q is (B*H, L, D): viewed as (B*H, 1, L, D)
    video: bool = False


def _dynamic_layout(grid: GridInfo, split) -> tuple[TokenLayout | None, str]:
    """Token layout from a split whose sides may be symbolic: a fixed side stays an int, a symbolic one
    becomes the layout's ``dynamic_text`` (its length is read from the sequence at each call)."""
    pre, suf = (static_int(x) for x in split)
    if pre is None and suf is None:
        return None, "text tokens of per-call length on both sides of the video: not supported"
    dyn = "prefix" if pre is None else "suffix" if suf is None else ""
    return TokenLayout(grid.frames, grid.height, grid.width, pre or 0, suf or 0, "THW", dyn), ""


def _symbolic_self(m: AttnMatch, grid: GridInfo, dfg: nx.DiGraph, qs, ks, base: Classification) -> Classification:
    """Queries and keys of symbolic lengths that are not provably equal (Framepack slices each of them by the
    text length, and each slice gets a fresh symbol): self-attention when both sequences are built the same
    way, fixed tokens and video at the same places and the per-call text on the same side.  At run time the
    op requires equal query/key lengths (it raises otherwise), so a mismatch is never computed silently."""
    N = grid.video_tokens
    sq, why_q = trace_sequence_split(dfg, m.q, qs[-2], N)
    sk, why_k = trace_sequence_split(dfg, m.k, ks[-2], N)
    lq = _dynamic_layout(grid, sq)[0] if sq is not None else None
    lk = _dynamic_layout(grid, sk)[0] if sk is not None else None
    if lq is None or lq != lk:
        why = why_q or why_k or f"queries {lq.describe() if lq else '?'}, keys {lk.describe() if lk else '?'}"
        return replace(base, reason=(f"3D attention with a symbolic sequence length: queries (q{qs}) and keys (k{ks}) "
                                     f"are not provably the same tokens ({why}); left dense"), video=True)
    return _finish(m, lq, ks[-2], base)


def classify(m: AttnMatch, grid: GridInfo | None, grid_reason: str, dfg: nx.DiGraph) -> Classification:
    """The :class:`Classification` of one match.

    The sequence length may be symbolic (text trimmed by value); the grid never is, so such a
    site is joint attention whose text side has a per-call length (``TokenLayout.dynamic_text``).
    """
    qs, ks = example_shape(m.q), example_shape(m.k)
    if qs is None or ks is None or len(qs) not in (3, 4):
        return Classification(SiteKind.OTHER, reason=f"q/k shapes unknown or not (B, H, L, D): {qs}, {ks}")
    merged = len(qs) == 3
    heads, head_dim = (1 if merged else static_int(qs[1])), static_int(qs[-1])
    if heads is None or head_dim is None:
        return Classification(SiteKind.OTHER, reason=f"symbolic head count or head dim (q{qs}): left dense", merged=merged)
    other = Classification(SiteKind.OTHER, heads=heads, head_dim=head_dim, merged=merged)
    lq, lk = qs[-2], ks[-2]
    if grid is None:
        return replace(other, reason=f"video grid unknown ({grid_reason})")
    N, P, T = grid.video_tokens, grid.height * grid.width, grid.frames
    symbolic = static_int(lq) is None or static_int(lk) is None
    if not known_equal(lq, lk):
        if static_int(lq) is None and static_int(lk) is None:
            return _symbolic_self(m, grid, dfg, qs, ks, other)
        sq = static_int(lq)  # a fixed and a per-call length: different tokens, so cross-attention
        kind = SiteKind.CROSS if sq is None or sq >= N else SiteKind.OTHER
        return replace(other, kind=kind, reason=f"queries attend to {lk} other tokens (cross-attention), never tiled")
    if symbolic:
        split, why = trace_sequence_split(dfg, m.q, lq, N)
        if split is None:
            return replace(other, video=True, reason=(f"3D attention with a symbolic sequence length (q{qs}), token "
                                                      f"layout unknown: {why}; left dense"))
    elif lq == N:
        split, why = (0, 0), ""
    elif lq > N:
        split, why = trace_sequence_split(dfg, m.q, lq, N)
    elif lq == P and T > 1:
        return replace(other, kind=SiteKind.SPATIAL, reason="attention within one frame (factorised spatial)")
    elif lq == T and T > 1:
        return replace(other, kind=SiteKind.TEMPORAL, reason="attention along time per pixel (factorised temporal)")
    else:
        return replace(other, reason=f"{lq} tokens do not relate to the {T}x{grid.height}x{grid.width} video grid")
    layout = None
    if split is not None:
        layout, why = _dynamic_layout(grid, split)
    if layout is None:
        return replace(other, video=True, reason="joint attention, token layout unknown: " + why)
    return _finish(m, layout, lk, other)


def _finish(m: AttnMatch, layout: TokenLayout, lk, base: Classification) -> Classification:
    """Kind of a site whose layout is established; problems the op cannot honour leave it dense."""
    pre_text = layout.text_prefix or layout.dynamic_text == "prefix"
    suf_text = layout.text_suffix or layout.dynamic_text == "suffix"
    kind = (SiteKind.VIDEO_SELF if not (pre_text or suf_text)
            else SiteKind.JOINT_TEXT_SUFFIX if suf_text else SiteKind.JOINT_TEXT_PREFIX)
    problems = list(m.problems)  # tokens on both sides (Framepack: packed history, then text) are fine for the op
    # an (L, L) mask only where the text is trimmed per call (HunyuanVideo 1.5); fixed-length sites keep the
    # key-padding-only rule they always had
    if m.mask is not None and not is_padding_mask(m.mask, lk, square=layout.is_dynamic):
        ms = example_shape(m.mask)
        problems.append(f"attention mask {ms} (not a text-padding mask) cannot be honoured by the tile op")
    if problems:
        return replace(base, kind=kind, reason="; ".join(problems) + ": left dense")
    return replace(base, kind=kind, layout=layout)


def _aliases(gm, example_inputs, root_names: RootNames | None) -> tuple[list, dict]:
    """``[(alias, root_prefix)]`` of the graph's parameter inputs (longest alias first), and those inputs."""
    params = param_placeholders(gm)
    if root_names is None:
        return [], params
    index = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    pairs = set()
    for node, local in params.items():
        i = index[node]
        if i < len(example_inputs):
            pair = root_names.alias(example_inputs[i], local)
            if pair is not None:
                pairs.add(pair)
    return sorted(pairs, key=lambda p: -len(p[0])), params


def _site_name(local: str, aliases: list) -> tuple[str | None, str, str]:
    """``(root name, alias, root_prefix)`` of a frame-relative module path."""
    for alias, prefix in aliases:
        name = rebase(local, alias, prefix)
        if name is not None:
            return name, alias, prefix
    return None, "", ""


def _anchor_for(m: AttnMatch, local_path: str, params: dict, dfg: nx.DiGraph):
    """A parameter of the site's module that feeds q/k/v: identifies the module instance at run time."""
    ancestors = set()
    for n in (m.q, m.k, m.v):
        if isinstance(n, torch.fx.Node):
            ancestors |= nx.ancestors(dfg, n)
    best = None
    for node, local in params.items():
        if node in ancestors and local.startswith(local_path + "."):
            if best is None or len(local) < len(best[1]):
                best = (node, local)
    return best or (None, None)


def detect_sites(gm: torch.fx.GraphModule, example_inputs, grid: GridInfo | None, grid_reason: str,
                 root_names: RootNames | None) -> list[SiteTemplate]:
    """All attention sites of ``gm`` as :class:`SiteTemplate` objects (graph order)."""
    matches = find_attention(gm)
    if not matches:
        return []
    dfg = dataflow_graph(gm)
    aliases, params = _aliases(gm, example_inputs, root_names)
    out, seen = [], {}
    for m in matches:
        local = local_module_path(m.out) or "self"  # no module stack: the frame's own module
        c = classify(m, grid, grid_reason, dfg)
        layout, reason = c.layout, c.reason
        anchor, anchor_local = _anchor_for(m, local, params, dfg)
        name, alias, prefix = _site_name(local, aliases)
        shared = bool(prefix)  # a block's own frame: the same graph may serve every block of its class
        if name is None:
            name = strip_self(local)
            if layout is not None:
                layout, reason = None, "the module running this attention was not found in the model"
        name = name or "<root>"
        k = seen.get(name, 0)
        seen[name] = k + 1
        if k:
            name = f"{name}#{k}"
        if shared and anchor is None and layout is not None:
            layout, reason = None, "graph shared by several modules and no parameter identifies the instance"
        site = AttentionSite(name, c.kind, layout, c.heads, c.head_dim, reason, m.form, video=c.video)
        out.append(SiteTemplate(site, m, local, anchor, anchor_local, shared, c.merged, alias=alias))
    return out


@register_pass("detect", 100)
def detect_pass(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    # every interpretation of the video input, each confirmed or rejected by the token-order probe (probe.py)
    ctx.templates, ctx.grid, ctx.grid_reason = select_grid(gm, ctx, detect_sites)
    ctx.sites = [t.site for t in ctx.templates]
    return gm
