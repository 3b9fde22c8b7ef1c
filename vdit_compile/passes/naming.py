"""Stable site names (module paths of the root model) for nodes of a Dynamo graph.

Dynamo records, per node, the stack of modules it was traced in (``nn_module_stack``) with
source strings such as ``L['self'].__dict__['_modules']['blocks'].0.attn1``; those are paths
relative to the frame Dynamo compiled.  For a full-graph capture that frame is the root model;
after a graph break it can be a block's ``forward`` (HunyuanVideo 1.5, Framepack), and one graph
then serves every block of that class.  Parameters arrive as graph inputs, so the path of the
frame's ``self`` inside the root is found by matching a parameter input against the root's
named parameters (identity), at compile time, or at run time for shared graphs.
"""
from __future__ import annotations

import re

import torch
import torch.fx

_PATTERNS = [
    (re.compile(r"\.__dict__\['_modules'\]\['([^']+)'\]"), r".\1"),
    (re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]"), r".\1"),
    (re.compile(r"\['([^']+)'\]"), r".\1"),
    (re.compile(r"\[(\d+)\]"), r".\1"),
]


def normalize_source(src: str) -> str:
    """``L['self'].__dict__['_modules']['blocks'].0.attn1`` -> ``self.blocks.0.attn1``."""
    s = src
    if s.startswith("L['self']"):
        s = "self" + s[len("L['self']"):]
    elif s.startswith("L["):
        s = s[1:]
    for pat, rep in _PATTERNS:
        s = pat.sub(rep, s)
    return s.lstrip(".")


def local_module_path(node: torch.fx.Node) -> str | None:
    """Innermost module path (frame-relative, ``self.``-prefixed) a node was traced in."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path, _cls = list(stack.values())[-1]
    return normalize_source(path if isinstance(path, str) else str(path))


def param_placeholders(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, str]:
    """Placeholders that are parameters/buffers, with their frame-relative names (``self.x.weight``)."""
    out = {}
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        ga = n.meta.get("grapharg")
        src = getattr(ga, "source", None)
        name = src.name if src is not None and isinstance(getattr(src, "name", None), str) else (
            src.name() if src is not None and callable(getattr(src, "name", None)) else None)
        if name and name.startswith("L['self']") and ("_parameters" in name or "_buffers" in name):
            out[n] = normalize_source(name)
    return out


def strip_self(path: str) -> str:
    return path[len("self."):] if path.startswith("self.") else ("" if path == "self" else path)


class RootNames:
    """Identity map from the root model's parameters to their names."""

    def __init__(self, root: torch.nn.Module):
        self.by_id = {}
        for name, p in root.named_parameters(remove_duplicate=False):
            self.by_id.setdefault(id(p), name)
        for name, b in root.named_buffers(remove_duplicate=False):
            self.by_id.setdefault(id(b), name)

    def frame_prefix(self, tensor, local_name: str) -> str | None:
        """Root path of the frame's ``self``: global name minus the frame-relative suffix."""
        g = self.by_id.get(id(tensor))
        suffix = strip_self(local_name)
        if g is None or not g.endswith(suffix):
            return None
        return g[: len(g) - len(suffix)].rstrip(".")


def join(prefix: str, local: str) -> str:
    rel = strip_self(local)
    return ".".join(p for p in (prefix, rel) if p)
