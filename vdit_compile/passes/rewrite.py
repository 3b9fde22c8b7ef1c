"""Rewrite pass: observers in calibrate/inspect mode, ``vdit::tile_attention`` in apply mode.

* ``inspect`` / ``calibrate``: before every attention site a call to
  :func:`vdit_compile.runtime.hooks.observe_site` is inserted; it records the site (resolving
  shared graphs to the module instance that runs them) and, when calibrating, feeds
  ``(q, k, v, scale)`` to the site's ``SiteCalibrator``.  The original attention still computes
  the output, so calibration sees the dense model.
* ``apply``: each tileable site with masks in the plan becomes
  ``torch.ops.vdit.tile_attention(q, k, v, text_prefix, text_suffix, grid, masks, scale)[0]``
  with the plan's per-head masks (any family) and the site's token tile as constants.  Where the
  text length is trimmed by value (a symbolic length in the graph), the text argument is the
  graph value ``q.size(-2) - fixed tokens`` (a ``SymInt``), so one graph serves every prompt;
  those graphs run eagerly too (inductor cannot lower some of their unbacked-length views).  Sites in a
  graph shared by several blocks call :func:`~vdit_compile.runtime.hooks.apply_shared`, which
  looks the instance's masks up at run time; so do sites with a key-padding mask (HunyuanVideo's
  text padding), which use the op when nothing is padded and dense masked SDPA (with a warning)
  otherwise.  Graphs with such sites run eagerly (the op inside still uses its CUDA kernel).
  Everything else is left as it was.
"""
from __future__ import annotations

import operator

import networkx as nx
import torch
import torch.fx

from ..ops.args import encode_masks, op_grid
from ..runtime import hooks
from .detect import dataflow_graph
from .registry import register_pass


def _scale(t) -> float:
    return float(t.match.scale) if t.match.scale is not None else float(t.site.head_dim) ** -0.5


def _erase_dead(graph: torch.fx.Graph, start: list, inside: set) -> None:
    """Erase now-unused nodes of the replaced attention (scores, softmax), nothing outside it."""
    todo = list(start)
    while todo:
        n = todo.pop()
        if n in inside and n.op in ("call_function", "call_method") and not n.users:
            inputs = list(n.all_input_nodes)
            graph.erase_node(n)
            inside.discard(n)
            todo.extend(inputs)


def _insert_observer(gm, t, tid, ctx) -> None:
    m = t.match
    with gm.graph.inserting_before(m.out):
        gm.graph.call_function(hooks.observe_site, (m.q, m.k, m.v, t.anchor, ctx.state.id, tid, _scale(t), m.mask))


def _text_args(g, q, lay):
    """``(text_prefix, text_suffix)`` op arguments: ints, or for a per-call text length (symbolic in the
    graph) a graph value ``q.size(-2) - fixed tokens``, an int at run time (the op's ``int`` takes a SymInt)."""
    if not lay.is_dynamic:
        return lay.text_prefix, lay.text_suffix
    size = g.call_method("size", (q, -2))
    text = g.call_function(operator.sub, (size, lay.static_tokens))
    qv = q.meta.get("example_value")
    if isinstance(qv, torch.Tensor):
        size.meta["example_value"] = qv.shape[-2]
        text.meta["example_value"] = qv.shape[-2] - lay.static_tokens
    return (text, lay.text_suffix) if lay.dynamic_text == "prefix" else (lay.text_prefix, text)


def _replace_with_op(gm, t, masks, tile, dfg) -> None:
    m, lay = t.match, t.site.layout
    g = gm.graph
    with g.inserting_before(m.out):
        q, k, v = m.q, m.k, m.v
        if t.merged_heads:
            q, k, v = (g.call_method("unsqueeze", (x, 1)) for x in (q, k, v))
        pre, suf = _text_args(g, m.q, lay)
        op = g.call_function(torch.ops.vdit.tile_attention.default,
                             (q, k, v, pre, suf, op_grid(lay, tile), encode_masks(masks), _scale(t)))
        out = g.call_function(operator.getitem, (op, 0))
        if t.merged_heads:
            out = g.call_method("squeeze", (out, 1))
    out.meta.update({k: v for k, v in m.out.meta.items() if k in ("nn_module_stack", "stack_trace", "example_value")})
    op.meta["nn_module_stack"] = m.out.meta.get("nn_module_stack", {})
    old = m.out
    old.replace_all_uses_with(out)
    inside = set()
    if m.form != "sdpa":
        src = {m.q, m.k}
        inside = {n for n in nx.descendants(dfg, m.q) | nx.descendants(dfg, m.k) if n in nx.ancestors(dfg, old)} | {old}
        inside -= src | {m.v}
    g.erase_node(old)
    _erase_dead(g, [a for a in old.all_input_nodes], inside)


def _replace_shared(gm, t, tid, ctx) -> None:
    m = t.match
    args = (m.q, m.k, m.v, t.anchor, ctx.state.id, tid, _scale(t), m.mask)
    with gm.graph.inserting_before(m.out):
        out = gm.graph.call_function(hooks.apply_shared, args)
    out.meta.update({k: v for k, v in m.out.meta.items() if k in ("nn_module_stack", "example_value")})
    m.out.replace_all_uses_with(out)
    gm.graph.erase_node(m.out)
    ctx.needs_eager = True  # a Python call inductor would trace into


@register_pass("rewrite", 200)
def rewrite_pass(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    state = ctx.state
    dfg = dataflow_graph(gm) if state.mode == "apply" else None
    changed = False
    for t in ctx.templates:
        tid = state.add_template(t)
        if state.mode in ("inspect", "calibrate"):
            _insert_observer(gm, t, tid, ctx)
            changed = True
            continue
        if not t.site.tileable:
            continue
        if t.shared or t.match.mask is not None:
            if state.masks_for(t.site) is None and not t.shared:
                continue
            _replace_shared(gm, t, tid, ctx)
            changed = True
            continue
        masks = state.masks_for(t.site)
        if masks is None:
            continue
        _replace_with_op(gm, t, masks, state.tile_for(t.site), dfg)
        if t.site.layout.is_dynamic:
            # inductor fails to lower some views of unbacked-length outputs (Framepack's slices after the op, on
            # inductor 2.13 CPU); such graphs run eagerly, the op inside still dispatches to its CUDA kernel
            ctx.needs_eager = True
        ctx.rewritten.append(t.site.name)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm
