"""Where the non-video tokens of a joint sequence sit, read from the ``cat`` that builds it.

Sizes may be symbolic: models that trim padded text by value (Mochi's ``nonzero``, Framepack's
``[:, :mask.sum()]``, HunyuanVideo 1.5's boolean indexing) give Dynamo graphs whose text length
is an unbacked ``SymInt``.  The video piece is still a plain int (the grid is static), so the
split is still read from the dataflow: walking back from ``q`` (networkx over the FX nodes) to
the nearest ``cat`` whose output along its dim has the sequence length, the piece holding
exactly the video tokens splits it.  When no piece is exactly the video but one fixed-size
piece is longer than it (Framepack packs history/clean-latent tokens in front of the video),
the split is read recursively from the ``cat`` building that piece.  Sizes are compared with
:func:`known_equal`, which never guards on (or errors for) unbacked symbols: an equality that
cannot be proven counts as different, so nothing is guessed.
"""
from __future__ import annotations

import networkx as nx
import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .attention import example_shape

_CAT = {torch.cat, torch.concat, torch.concatenate}
_MAX_NESTING = 4


def static_int(x) -> int | None:
    """``x`` as an int when it is one or a ``SymInt`` whose expression is a number, else ``None``."""
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        expr = x.node.expr
        return int(expr) if getattr(expr, "is_number", False) else None
    return None


def known_equal(a, b) -> bool:
    """``a == b`` provably (ints, or ``SymInt`` expressions equal for every value of their symbols)."""
    if a is None or b is None:
        return False
    sa, sb = static_int(a), static_int(b)
    if sa is not None and sb is not None:
        return sa == sb
    if sa is not None and sb is None or sa is None and sb is not None:
        return False  # a symbolic length is never proven equal to a fixed one here
    return bool(statically_known_true(a == b))


def _cat_parts(node: torch.fx.Node):
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return tensors, dim


def _nearest_cat(dfg: nx.DiGraph, start: torch.fx.Node, seq_len):
    """The nearest ``cat`` ancestor of ``start`` producing ``seq_len`` tokens along its dim: ``(node, pieces, sizes)``."""
    for node in nx.bfs_tree(dfg.reverse(copy=False), start, depth_limit=64):
        if node.op != "call_function" or node.target not in _CAT:
            continue
        tensors, dim = _cat_parts(node)
        out = example_shape(node)
        if out is None or not isinstance(dim, int) or not known_equal(out[dim % len(out)], seq_len):
            continue
        sizes = [example_shape(t)[dim % len(out)] if example_shape(t) else None for t in tensors]
        return node, list(tensors), sizes
    return None, [], []


def _total(sizes):
    """Sum of sizes: an int when every one is fixed, else the symbolic sum."""
    total = 0
    for s in sizes:
        total = total + (static_int(s) if static_int(s) is not None else s)
    return total


def trace_sequence_split(dfg: nx.DiGraph, q: torch.fx.Node, seq_len, video: int, _depth: int = 0):
    """``((prefix, suffix), "")`` around the ``video`` tokens of ``q``'s ``seq_len``-token sequence.

    Each side is an int, or a ``SymInt`` when its length is only known per call; ``(None, why)``
    when the dataflow does not establish the split.
    """
    node, tensors, sizes = _nearest_cat(dfg, q, seq_len)
    if node is None:
        return None, f"{seq_len} tokens = {video} video + others, but no concatenation building them was found"
    if None in sizes:
        return None, f"the {seq_len}-token sequence is a concatenation of pieces of unknown size {sizes}"
    hits = [i for i, s in enumerate(sizes) if known_equal(s, video)]
    if len(hits) == 1:
        i = hits[0]
        return (_total(sizes[:i]), _total(sizes[i + 1:])), ""
    longer = [i for i, s in enumerate(sizes) if static_int(s) is not None and static_int(s) > video]
    if not hits and len(longer) == 1 and _depth < _MAX_NESTING and isinstance(tensors[longer[0]], torch.fx.Node):
        i = longer[0]  # video packed with other fixed-size tokens: read that piece's own concatenation
        inner, why = trace_sequence_split(dfg, tensors[i], static_int(sizes[i]), video, _depth + 1)
        if inner is not None:
            return (_total(sizes[:i] + [inner[0]]), _total([inner[1]] + sizes[i + 1:])), ""
        return None, why
    return None, (f"the {seq_len}-token sequence is a concatenation of pieces {sizes}; "
                  f"none is exactly the {video} video tokens, so the extra tokens' positions are unknown")
