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
    (re.compile(r"(^|\.)(?:__dict__\.)?_modules\."), r"\1"),  # torch.export's dotted ``_modules.`` spelling
]


def normalize_source(src: str) -> str:
    """``L['self'].__dict__['_modules']['blocks'].0.attn1`` -> ``self.blocks.0.attn1``.

    Dynamo's source strings and torch.export's ``nn_module_stack`` paths (``blocks.0.attn1``, or strict
    export's ``L['self'].blocks[0].attn1``) both go through here: one spelling of a site's name."""
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


def module_path(node: torch.fx.Node) -> str | None:
    """Root-relative module path (``blocks.0.attn1``) a node was traced in, for graphs traced from the root
    model (torch.export; ``""`` for the root itself), or ``None`` without a module stack."""
    local = local_module_path(node)
    return strip_self(local) if local is not None else None


def _source_name(node) -> str | None:
    src = getattr(node.meta.get("grapharg"), "source", None)
    if src is None:
        return None
    name = src.name() if callable(getattr(src, "name", None)) else getattr(src, "name", None)
    return name if isinstance(name, str) else None


def param_placeholders(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, str]:
    """Placeholders that are parameters/buffers, with their normalised source names (``self.x.weight``)."""
    out = {}
    for n in gm.graph.nodes:
        name = _source_name(n) if n.op == "placeholder" else None
        if name and ("_parameters" in name or "_buffers" in name):
            out[n] = normalize_source(name)
    return out


def strip_self(path: str) -> str:
    return path[len("self."):] if path.startswith("self.") else ("" if path == "self" else path)


def rebase(local: str, alias: str, prefix: str) -> str | None:
    """``local`` with its leading ``alias`` (the frame's name for a module) replaced by its root path."""
    comps, a = local.split("."), (alias.split(".") if alias else [])
    if comps[: len(a)] != a:
        return None
    return ".".join(([prefix] if prefix else []) + comps[len(a):])


class RootNames:
    """Identity map from the root model's parameters to their names."""

    def __init__(self, root: torch.nn.Module):
        self.by_id, self.by_ptr = {}, {}
        for name, p in list(root.named_parameters(remove_duplicate=False)) + list(root.named_buffers(remove_duplicate=False)):
            self.by_id.setdefault(id(p), name)
            if p.numel():  # compiled code may hand over another tensor object on the same storage
                self.by_ptr.setdefault((p.data_ptr(), tuple(p.shape)), name)

    def alias(self, tensor, local_name: str) -> tuple[str, str] | None:
        """``(alias, root_prefix)``: how the frame names the module that is ``root_prefix`` in the root.

        ``self.attn.to_q.weight`` in a block's frame that is ``blocks.3.attn.to_q.weight`` in the root
        gives ``("self", "blocks.3")``; in the root's own frame ``("self", "")``.
        """
        g = self.by_id.get(id(tensor))
        if g is None and isinstance(tensor, torch.Tensor) and tensor.numel():
            g = self.by_ptr.get((tensor.data_ptr(), tuple(tensor.shape)))
        if g is None:
            return None
        lp, gp = local_name.split("."), g.split(".")
        n = 0
        while n < min(len(lp), len(gp)) and lp[-1 - n] == gp[-1 - n]:
            n += 1
        if n == 0:
            return None
        return ".".join(lp[: len(lp) - n]), ".".join(gp[: len(gp) - n])
