"""Find attention computations in a Dynamo FX graph.

Two forms are recognised, both at the Dynamo (torch-level) graph, before AOTAutograd turns
SDPA into device-specific ATen ops:

* ``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)``;
* hand-written ``softmax(scale * (q @ k^T) [+ mask]) @ v`` with ``matmul`` / ``@`` / ``bmm`` /
  ``einsum`` / ``baddbmm`` products, scaling by ``mul``/``div`` before or after the product,
  and dtype casts anywhere on the path.

Each hit becomes an :class:`AttnMatch` naming the q/k/v nodes, the node whose value is the
attention output (what a rewrite replaces), the scale and the mask; anything the tile op cannot
honour (dropout, causal, GQA, ``masked_fill`` masks) is recorded in ``problems``.
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F

_SDPA = {F.scaled_dot_product_attention, getattr(torch._C._nn, "scaled_dot_product_attention", None)} - {None}
_SDPA_SIG = inspect.signature(
    lambda query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False: None
)
_SOFTMAX_FNS = {torch.softmax, F.softmax, torch.Tensor.softmax, torch.special.softmax}
_MATMUL_FNS = {torch.matmul, operator.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.bmm}
_CAST_METHODS = {"float", "half", "bfloat16", "to", "type_as", "contiguous", "double"}
_MUL = {operator.mul, torch.mul, torch.Tensor.mul}
_DIV = {operator.truediv, torch.div, torch.true_divide, torch.Tensor.div}
_ADD = {operator.add, torch.add, torch.Tensor.add}


@dataclass
class AttnMatch:
    """One attention computation in a graph."""

    out: torch.fx.Node  # node producing the attention output (replaced by a rewrite)
    q: torch.fx.Node
    k: torch.fx.Node
    v: torch.fx.Node
    scale: float | None  # None: the SDPA default 1/sqrt(D)
    form: str  # "sdpa" | "matmul" | "einsum" | "bmm" | "baddbmm"
    mask: torch.fx.Node | None = None
    problems: list[str] = field(default_factory=list)

    def shape(self, node: torch.fx.Node) -> tuple | None:
        return example_shape(node)


def example_value(node):
    return node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None


def example_shape(node) -> tuple | None:
    ev = example_value(node)
    return tuple(ev.shape) if isinstance(ev, torch.Tensor) else None


def static_shape(shape) -> bool:
    return shape is not None and all(isinstance(s, int) for s in shape)


def _is_call(node, fns=(), methods=()) -> bool:
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "call_function" and node.target in fns:
        return True
    return node.op == "call_method" and node.target in methods


def _number(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def find_attention(gm: torch.fx.GraphModule) -> list[AttnMatch]:
    """Every attention computation in ``gm`` in graph order."""
    matches = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _SDPA:
            matches.append(_match_sdpa(node))
        elif _is_call(node, _SOFTMAX_FNS, {"softmax"}):
            m = _match_manual(node)
            if m is not None:
                matches.append(m)
    return matches


def _match_sdpa(node: torch.fx.Node) -> AttnMatch:
    a = _SDPA_SIG.bind(*node.args, **node.kwargs).arguments
    m = AttnMatch(node, a["query"], a["key"], a["value"], a.get("scale"), "sdpa", a.get("attn_mask"))
    if m.scale is not None and _number(m.scale) is None:
        m.problems.append("the attention scale is not a constant")
    if (_number(a.get("dropout_p", 0.0)) or 0.0) != 0.0:
        m.problems.append("attention dropout is on")
    if a.get("is_causal", False):
        m.problems.append("causal attention")
    qs, ks = example_shape(m.q), example_shape(m.k)
    if a.get("enable_gqa", False) or (qs and ks and len(qs) == len(ks) == 4 and qs[1] != ks[1]):
        m.problems.append("grouped-query attention (fewer key/value heads than query heads)")
    return m


# ----------------------------------------------------------------------------- manual softmax


def _strip_casts(node):
    while _is_call(node, (), _CAST_METHODS) or (
        isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in (F.dropout,)
    ):
        node = node.args[0]
    return node


def _softmax_dim(node) -> int | None:
    args = list(node.args[1:]) + [node.kwargs.get("dim")]
    for a in args:
        if isinstance(a, int):
            return a
    return None


def _untranspose(node):
    """``k`` for a node computing ``k^T`` (last two dims swapped), else ``None``."""
    if not isinstance(node, torch.fx.Node):
        return None
    shape = example_shape(node)
    nd = len(shape) if shape else None
    if _is_call(node, (torch.transpose,), {"transpose"}) and nd:
        d = sorted(x % nd for x in node.args[1:3])
        return node.args[0] if d == [nd - 2, nd - 1] else None
    if _is_call(node, (torch.permute,), {"permute"}) and nd:
        perm = node.args[1] if isinstance(node.args[1], (tuple, list)) else node.args[1:]
        perm = [p % nd for p in perm]
        want = list(range(nd - 2)) + [nd - 1, nd - 2]
        return node.args[0] if perm == want else None
    if node.op == "call_function" and node.target is getattr and node.args[1] == "mT":
        return node.args[0]
    return None


def _parse_einsum(eq: str):
    eq = eq.replace(" ", "")
    lhs, out = eq.split("->")
    ins = lhs.split(",")
    return ins, out


def _scores_source(node):
    """Peel scale/mask/casts off the softmax input: ``(product node, scale, mask, problems)``."""
    scale, mask, problems = 1.0, None, []
    for _ in range(16):
        node = _strip_casts(node)
        if _is_call(node, _MUL, {"mul"}):
            a, b = node.args[0], node.args[1]
            if _number(b) is not None:
                scale, node = scale * _number(b), a
                continue
            if _number(a) is not None:
                scale, node = scale * _number(a), b
                continue
            return None
        if _is_call(node, _DIV, {"div"}) and _number(node.args[1]) is not None:
            scale, node = scale / _number(node.args[1]), node.args[0]
            continue
        if _is_call(node, _ADD, {"add"}):
            a, b = node.args[0], node.args[1]
            pa = _product(_strip_casts(a)) if isinstance(a, torch.fx.Node) else None
            node, other = (a, b) if pa is not None or _is_call(_strip_casts(a), _MUL | _DIV, {"mul", "div"}) else (b, a)
            mask = other
            continue
        if _is_call(node, (torch.masked_fill,), {"masked_fill", "masked_fill_"}):
            problems.append("masked_fill attention mask")
            node = node.args[0]
            continue
        return node, scale, mask, problems
    return None


def _product(node):
    """``(q, k, form, extra_scale, mask)`` if ``node`` is ``q @ k^T`` in a recognised form."""
    if _is_call(node, _MATMUL_FNS, {"matmul", "bmm"}):
        k = _untranspose(node.args[1])
        form = "bmm" if node.target in (torch.bmm, torch.Tensor.bmm, "bmm") else "matmul"
        return (node.args[0], k, form, 1.0, None) if k is not None else None
    if _is_call(node, (torch.baddbmm,), {"baddbmm"}):
        inp, b1, b2 = node.args[:3] if node.op == "call_function" else (node.args[0], node.args[1], node.args[2])
        k = _untranspose(b2)
        alpha = _number(node.kwargs.get("alpha", 1.0))
        beta = _number(node.kwargs.get("beta", 1.0))
        if k is None or alpha is None:
            return None
        return b1, k, "baddbmm", alpha, (inp if beta != 0 else None)
    if _is_call(node, (torch.einsum,), ()) and isinstance(node.args[0], str) and len(node.args) == 3:
        (a, b), out = _parse_einsum(node.args[0])
        if len(a) >= 2 and len(b) >= 2 and a[:-2] == b[:-2] and out == a[:-2] + a[-2] + b[-2] and a[-1] == b[-1]:
            return node.args[1], node.args[2], "einsum", 1.0, None
        if len(a) >= 2 and len(b) >= 2 and a[:-2] == b[:-2] and out == a[:-2] + a[-2] + b[-1] and a[-1] == b[-2]:
            k = _untranspose(node.args[2])
            return (node.args[1], k, "einsum", 1.0, None) if k is not None else None
    return None


def _output_product(softmax: torch.fx.Node):
    """The ``attn @ v`` node consuming the softmax and ``v``, following casts/dropout."""
    node = softmax
    for _ in range(4):
        users = list(node.users)
        if len(users) != 1:
            return None
        u = users[0]
        if _is_call(u, (), _CAST_METHODS) or (u.op == "call_function" and u.target is F.dropout):
            node = u
            continue
        if _is_call(u, _MATMUL_FNS, {"matmul", "bmm"}) and u.args[0] is node:
            return u, u.args[1]
        if _is_call(u, (torch.einsum,), ()) and isinstance(u.args[0], str) and len(u.args) == 3 and u.args[1] is node:
            (a, b), out = _parse_einsum(u.args[0])
            if len(a) >= 2 and a[:-2] == b[:-2] and a[-1] == b[-2] and out == a[:-2] + a[-2] + b[-1]:
                return u, u.args[2]
        return None
    return None


def _match_manual(softmax: torch.fx.Node) -> AttnMatch | None:
    shape = example_shape(softmax)
    dim = _softmax_dim(softmax)
    if shape is None or dim is None or dim % len(shape) != len(shape) - 1:
        return None
    src = _scores_source(softmax.args[0])
    if src is None:
        return None
    prod_node, scale, mask, problems = src
    prod = _product(prod_node)
    if prod is None:
        return None
    q, k, form, alpha, bmask = prod
    outp = _output_product(softmax)
    if outp is None:
        return None
    out, v = outp
    m = AttnMatch(out, q, k, v, scale * alpha, form, mask if mask is not None else bmask, problems)
    if any(u.op == "call_function" and u.target is F.dropout for u in softmax.users):
        m.problems.append("attention dropout is on")
    return m
