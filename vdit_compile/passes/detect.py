"""Detection pass: find, name and classify every attention site of a graph and infer its layout.

Classification uses the token grid of the call (:mod:`.grid`) and the q/k shapes:

* ``video_self``: queries and keys are exactly the ``T'*H'*W'`` video tokens;
* ``joint_text_prefix`` / ``joint_text_suffix``: video plus other tokens; where those sit is
  read from the dataflow graph, never guessed: walking back from ``q`` (networkx over the FX
  nodes) to the ``cat`` that builds the sequence, the piece holding exactly the video tokens
  splits it into a prefix (CogVideoX) and a suffix (HunyuanVideo);
* ``cross``: queries and keys of different lengths (video queries on text keys);
* ``spatial`` / ``temporal``: one frame's ``H'*W'`` tokens per batch row, or ``T'`` tokens
  per pixel (Latte, ``TransformerTemporalModel``): not 3D, left alone;
* ``other``: anything else (text refiners, audio, pooling).

A 3D site whose layout cannot be established (unknown grid, untraceable split, attention
mask, dropout, GQA, symbolic lengths) gets ``layout=None`` and a reason: it stays dense.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx

from ..layout import TokenLayout
from .attention import AttnMatch, example_shape, find_attention, static_shape
from .grid import GridInfo
from .probe import probe_layout
from .naming import RootNames, local_module_path, param_placeholders, rebase, strip_self
from .registry import register_pass

TILEABLE_KINDS = ("video_self", "joint_text_prefix", "joint_text_suffix")
_CAT = {torch.cat, torch.concat, torch.concatenate}


@dataclass
class AttentionSite:
    """One attention site: stable module-path name, kind, token layout (or ``None``) and why."""

    name: str
    kind: str
    layout: TokenLayout | None
    num_heads: int
    head_dim: int
    reason: str = ""
    form: str = "sdpa"

    @property
    def tileable(self) -> bool:
        return self.kind in TILEABLE_KINDS and self.layout is not None

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


def _cat_parts(node: torch.fx.Node):
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return tensors, dim


def trace_sequence_split(dfg: nx.DiGraph, q: torch.fx.Node, seq_len: int, video: int) -> tuple[tuple[int, int] | None, str]:
    """``((prefix, suffix), "")`` from the nearest ``cat`` building the ``seq_len`` sequence of ``q``."""
    for node in nx.bfs_tree(dfg.reverse(copy=False), q, depth_limit=64):
        if node.op != "call_function" or node.target not in _CAT:
            continue
        tensors, dim = _cat_parts(node)
        out = example_shape(node)
        if not static_shape(out) or not isinstance(dim, int) or out[dim % len(out)] != seq_len:
            continue
        sizes = [example_shape(t)[dim % len(out)] if example_shape(t) else None for t in tensors]
        hits = [i for i, s in enumerate(sizes) if s == video]
        if len(hits) != 1 or None in sizes:
            return None, (f"the {seq_len}-token sequence is a concatenation of pieces {sizes}; "
                          f"none is exactly the {video} video tokens, so the extra tokens' positions are unknown")
        i = hits[0]
        return (sum(sizes[:i]), sum(sizes[i + 1:])), ""
    return None, f"{seq_len} tokens = {video} video + {seq_len - video} others, but no concatenation building them was found"


def is_key_padding_mask(mask, seq_len: int) -> bool:
    """A ``(B|1, 1, 1, L)`` mask (text padding): honoured at run time (see ``hooks.apply_key_masked``)."""
    ms = example_shape(mask)
    return ms is not None and len(ms) == 4 and ms[1] == 1 and ms[2] == 1 and ms[3] == seq_len


def classify(m: AttnMatch, grid: GridInfo | None, grid_reason: str, dfg: nx.DiGraph):
    """``(kind, layout, reason, heads, head_dim, merged)`` of one match."""
    qs, ks = example_shape(m.q), example_shape(m.k)
    if qs is None or ks is None or len(qs) not in (3, 4):
        return "other", None, f"q/k shapes unknown or not (B, H, L, D): {qs}, {ks}", 0, 0, False
    merged = len(qs) == 3
    heads, head_dim = (1 if merged else qs[1]), qs[-1]
    if not static_shape(qs) or not static_shape(ks):
        return "other", None, (
            f"3D attention with a symbolic sequence length (q{qs}): the model trims tokens by value; left dense"), heads, head_dim, merged
    lq, lk, bq = qs[-2], ks[-2], qs[0]
    if grid is None:
        return "other", None, f"video grid unknown ({grid_reason})", heads, head_dim, merged
    N, P, T = grid.video_tokens, grid.height * grid.width, grid.frames
    if lq != lk:
        kind = "cross" if lq >= N else "other"
        return kind, None, f"queries attend to {lk} other tokens (cross-attention), never tiled", heads, head_dim, merged
    if lq == N:
        kind, split, why = "video_self", (0, 0), ""
    elif lq > N:
        split, why = trace_sequence_split(dfg, m.q, lq, N)
        kind = "joint_text_suffix" if split and split[1] and not split[0] else "joint_text_prefix"
        if split and split[0] and split[1]:
            split, why = None, f"extra tokens on both sides of the video ({split[0]} before, {split[1]} after): not supported"
    elif lq == P and T > 1:
        return "spatial", None, "attention within one frame (factorised spatial)", heads, head_dim, merged
    elif lq == T and T > 1:
        return "temporal", None, "attention along time per pixel (factorised temporal)", heads, head_dim, merged
    else:
        return "other", None, f"{lq} tokens do not relate to the {T}x{grid.height}x{grid.width} video grid", heads, head_dim, merged
    if split is None:
        return "other", None, "joint attention, token layout unknown: " + why, heads, head_dim, merged
    problems = list(m.problems)
    if m.mask is not None and not is_key_padding_mask(m.mask, lk):
        ms = example_shape(m.mask)
        problems.append(f"attention mask {ms} (not a key-padding mask) cannot be honoured by the tile op")
    if problems:
        return kind, None, "; ".join(problems) + ": left dense", heads, head_dim, merged
    layout = TokenLayout(T, grid.height, grid.width, split[0], split[1], "THW")
    return kind, layout, "", heads, head_dim, merged


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
        kind, layout, reason, heads, hd, merged = classify(m, grid, grid_reason, dfg)
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
        site = AttentionSite(name, kind, layout, heads, hd, reason, m.form)
        out.append(SiteTemplate(site, m, local, anchor, anchor_local, shared, merged, alias=alias))
    return out


@register_pass("detect", 100)
def detect_pass(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    ctx.templates = detect_sites(gm, ctx.example_inputs, ctx.grid, ctx.grid_reason, ctx.root_names)
    first = next((t for t in ctx.templates if t.site.tileable), None)
    if first is not None and getattr(ctx.config, "probe", True):
        problem = probe_layout(gm, ctx.example_inputs, first, ctx.grid)
        same = [t for t in ctx.templates if t.site.layout == first.site.layout]
        for t in same:
            if problem:
                t.site.layout, t.site.reason = None, problem
            elif problem == "":
                t.notes.append("token order confirmed by probe")
    ctx.sites = [t.site for t in ctx.templates]
    return gm
