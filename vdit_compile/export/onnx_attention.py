"""ONNX translation of ``torch.ops.vdit.tile_attention`` into standard ONNX operators.

The exporter (``torch.onnx.export(..., dynamo=True)``) calls :func:`tile_attention_onnx` through
``custom_translation_table`` with the op's tensors as ONNX values and its integer mask arguments as
Python ints, so the sparsity pattern is known while the graph is built.  Any ONNX runtime can run the
result; no custom kernel is needed.

Algorithm ("band" form, exact, never an ``L x L`` tensor for a sparse head group).  Heads with equal
``(g, w)`` form one group.  For a group:

* *full rows* (text queries and the queries of the ``g`` global frames) attend to every key:
  scores ``(pre + g*P + suf) x L``;
* every other query frame ``f`` (``g <= f < T``) attends to the text keys, the ``g*P`` global keys
  and a gathered band of ``2w+1`` frames ``f-w .. f+w``; band frames outside ``[g, T)`` (outside the
  clip, or already counted as global) get a ``-inf`` bias.  Scores ``P x (text + g*P + (2w+1)*P)``
  per query frame.  The three column blocks (text, global, band) share one softmax without being
  concatenated: common row maximum, summed exponentials, one division at the end.

The band indices and bias depend only on ``T``, so with a static frame count they are constants,
and with a dynamic one (``num_frames`` arrives as a symbolic value) they are computed in-graph from
``Range`` and the rule stays exact for every ``T > g``.  The log-sum-exp is max-shifted and
returned, so the op's second output (``lse``) is exact too.

:func:`tile_attention_custom_node` instead emits one ``vdit.TileAttention`` node (custom domain) for
runtimes that provide a fused kernel; see docs/export.md for its contract.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from onnxscript import ir
from onnxscript.onnx_opset import opset18 as op

from ..masks.tile import DENSE

#: Custom-domain node emitted by :func:`tile_attention_custom_node`.
CUSTOM_DOMAIN, CUSTOM_OP = "vdit", "TileAttention"

_INT_MAX = np.iinfo(np.int64).max


def _ints(values) -> ir.Value:
    return op.Constant(value=ir.tensor(np.asarray(values, dtype=np.int64).reshape(-1)))


def _dim(x) -> ir.Value:
    """1-D int64 tensor of one element from a Python int or a symbolic (0-d/1-d int) value."""
    if isinstance(x, (int, np.integer)):
        return _ints([int(x)])
    return op.Reshape(op.Cast(x, to=ir.DataType.INT64), _ints([1]))


def _arith(a, b, fn_py, fn_onnx):
    if isinstance(a, (int, np.integer)) and isinstance(b, (int, np.integer)):
        return fn_py(int(a), int(b))
    return fn_onnx(_dim(a), _dim(b))


def _sub(a, b):
    return _arith(a, b, lambda x, y: x - y, op.Sub)


def _mul(a, b):
    return _arith(a, b, lambda x, y: x * y, op.Mul)


def _div(a, b):
    return _arith(a, b, lambda x, y: x // y, op.Div)


def _slice(x: ir.Value, start, end, axis: int) -> ir.Value:
    return op.Slice(x, _dim(start), _dim(end), _ints([axis]))


def _shape_of(x: ir.Value, axis: int):
    """Static size of ``x`` along ``axis`` as an int, else a 1-D int64 value."""
    d = x.shape[axis] if x.shape is not None else None
    if isinstance(d, int):
        return d
    return op.Shape(x, start=axis, end=axis + 1 if axis != -1 else None)


def _cat_dims(*dims) -> ir.Value:
    return op.Concat(*[_dim(d) for d in dims], axis=0)


def _attend(q, k, s, scale: float, bias=None):
    """Softmax probabilities and log-sum-exp (last axis kept) of ``scale * (q @ k)`` or given scores ``s``."""
    if s is None:
        s = op.MatMul(q, k)
    s = op.Mul(s, op.CastLike(op.Constant(value_float=float(scale)), s))
    if bias is not None:
        s = op.Add(s, bias)
    m = op.ReduceMax(s, _ints([-1]), keepdims=1)
    lse = op.Add(op.Log(op.ReduceSum(op.Exp(op.Sub(s, m)), _ints([-1]), keepdims=1)), m)
    return op.Exp(op.Sub(s, lse)), lse


def _dense_group(q, k, v, scale):
    p, lse = _attend(q, op.Transpose(k, perm=[0, 1, 3, 2]), None, scale)
    return op.MatMul(p, v), op.Squeeze(lse, _ints([-1]))


def _band(g: int, w: int, T, np_dtype):
    """Band gather indices ``(T-g, 2w+1)`` and additive bias ``(T-g, 2w+1)`` (0 kept, -inf dropped)."""
    offsets = np.arange(-w, w + 1)
    if isinstance(T, int):
        j = np.arange(g, T)[:, None] + offsets[None, :]
        bias = np.where((j >= g) & (j < T), 0.0, -np.inf).astype(np_dtype)
        return op.Constant(value=ir.tensor(np.clip(j, 0, T - 1).astype(np.int64))), op.Constant(value=ir.tensor(bias))
    t = op.Squeeze(_dim(T), _ints([0]))
    one = op.Constant(value=ir.tensor(np.array(1, dtype=np.int64)))
    first = op.Constant(value=ir.tensor(np.array(g, dtype=np.int64)))
    j = op.Add(op.Unsqueeze(op.Range(first, t, one), _ints([1])), op.Unsqueeze(_ints(offsets), _ints([0])))
    keep = op.And(op.GreaterOrEqual(j, first), op.Less(j, t))
    zero = op.Constant(value=ir.tensor(np.array(0.0, dtype=np_dtype)))
    ninf = op.Constant(value=ir.tensor(np.array(-np.inf, dtype=np_dtype)))
    idx = op.Clip(j, op.Constant(value=ir.tensor(np.array(0, dtype=np.int64))), op.Sub(t, one))
    return idx, op.Where(keep, zero, ninf)


def _add(a, b):
    return _arith(a, b, lambda x, y: x + y, op.Add)


def _text(x, pre: int, suf: int):
    parts = ([_slice(x, 0, pre, 2)] if pre else []) + ([_slice(x, -suf, _INT_MAX, 2)] if suf else [])
    return op.Concat(*parts, axis=2) if len(parts) > 1 else parts[0]


def _sparse_group(q, k, v, pre: int, suf: int, T, P, g: int, w: int, scale: float, np_dtype):
    """Exact tile attention of one head group with mask ``(g, w)``; see the module docstring."""
    L, D, Dv = _shape_of(q, 2), _shape_of(q, 3), _shape_of(v, 3)
    gp = _mul(g, P)
    head = _add(pre, gp)  # rows [0, head) are text prefix + global frames
    # full rows: text prefix, global frames, text suffix -> every key
    full_q = _slice(q, 0, head, 2)
    if suf:
        full_q = op.Concat(full_q, _slice(q, -suf, _INT_MAX, 2), axis=2)
    full_out, full_lse = _dense_group(full_q, k, v, scale)

    # band rows: video frames g .. T-1, (B, h, T-g, P, D)
    def frames(x, d):
        return op.Reshape(_slice(x, pre, _sub(L, suf), 2), _cat_dims(0, 0, -1, P, d))

    kv, vv = frames(k, D), frames(v, Dv)
    q_rest = _slice(frames(q, D), g, _INT_MAX, 2)
    idx, bias = _band(g, w, T, np_dtype)
    keys = [op.Reshape(op.Gather(kv, idx, axis=2), _cat_dims(0, 0, 0, -1, D))]  # (B, h, T-g, (2w+1)P, D)
    vals = [op.Reshape(op.Gather(vv, idx, axis=2), _cat_dims(0, 0, 0, -1, Dv))]
    bias = op.Reshape(op.Expand(op.Unsqueeze(bias, _ints([2])), _cat_dims(1, 1, P)), _cat_dims(0, 1, -1))
    if g:  # global keys, shared by every band row: (B, h, 1, g*P, D)
        glob = lambda x, d: op.Unsqueeze(_slice(op.Reshape(x, _cat_dims(0, 0, -1, d)), 0, gp, 2), _ints([2]))
        keys.insert(0, glob(kv, D))
        vals.insert(0, glob(vv, Dv))
    if pre or suf:  # text keys, shared by every band row: (B, h, 1, pre+suf, D)
        keys.insert(0, op.Unsqueeze(_text(k, pre, suf), _ints([2])))
        vals.insert(0, op.Unsqueeze(_text(v, pre, suf), _ints([2])))
    # one softmax over the column blocks [text | global | band] without concatenating them: shared
    # row max, summed exponentials, one division at the end (exact; avoids copying the score blocks)
    sc = None
    blocks = []
    for i, kk in enumerate(keys):
        s = op.MatMul(q_rest, op.Transpose(kk, perm=[0, 1, 2, 4, 3]))
        if sc is None:
            sc = op.CastLike(op.Constant(value_float=float(scale)), s)
        s = op.Mul(s, sc)
        blocks.append(op.Add(s, bias) if i == len(keys) - 1 else s)
    maxima = [op.ReduceMax(b, _ints([-1]), keepdims=1) for b in blocks]
    m = op.Max(*maxima) if len(maxima) > 1 else maxima[0]
    exps = [op.Exp(op.Sub(b, m)) for b in blocks]
    sums = [op.ReduceSum(e, _ints([-1]), keepdims=1) for e in exps]
    total = op.Sum(*sums) if len(sums) > 1 else sums[0]
    lse = op.Add(op.Log(total), m)
    parts = [op.MatMul(e, vals_i) for e, vals_i in zip(exps, vals)]
    out = op.Div(op.Sum(*parts) if len(parts) > 1 else parts[0], total)
    outs = [_slice(full_out, 0, head, 2), op.Reshape(out, _cat_dims(0, 0, -1, Dv))]
    lses = [_slice(full_lse, 0, head, 2), op.Reshape(lse, _cat_dims(0, 0, -1))]
    if suf:
        outs.append(_slice(full_out, head, _INT_MAX, 2))
        lses.append(_slice(full_lse, head, _INT_MAX, 2))
    return op.Concat(*outs, axis=2), op.Concat(*lses, axis=2)


def _static(x, what: str) -> int:
    if not isinstance(x, (int, np.integer)):
        raise NotImplementedError(f"vdit.tile_attention export needs {what} to be a constant int, found {x!r}")
    return int(x)


def _groups(global_frames: Sequence[int], windows: Sequence[int], H: int, T) -> dict:
    """Heads with equal effective masks: ``{(g, w) or 'dense': [heads]}`` in first-seen order."""
    gs = [_static(g, "global_frames") for g in global_frames]
    ws = [_static(w, "windows") for w in windows]
    if len(gs) == 1:
        gs, ws = gs * H, ws * H
    if len(gs) != H or len(ws) != H:
        raise ValueError(f"vdit.tile_attention: {len(gs)} global_frames / {len(ws)} windows for {H} heads")
    groups: dict = {}
    for h, (g, w) in enumerate(zip(gs, ws)):
        key = (g, w)
        if g == DENSE or (isinstance(T, int) and (g >= T or w >= T - 1)):
            key = "dense"  # every key frame kept (at this static T): plain attention is exact
        groups.setdefault(key, []).append(h)
    return groups


def tile_attention_onnx(q, k, v, text_prefix, text_suffix, num_frames, global_frames, windows, scale):
    """Translation of ``vdit::tile_attention`` for ``custom_translation_table``: returns ``(out, lse)``."""
    pre, suf = _static(text_prefix, "text_prefix"), _static(text_suffix, "text_suffix")
    H = q.shape[1] if q.shape is not None else None
    if not isinstance(H, int):
        raise NotImplementedError(f"vdit.tile_attention export needs a static head count, found q of shape {q.shape}")
    dtype = q.dtype
    compute = dtype if dtype in (ir.DataType.FLOAT, ir.DataType.DOUBLE) else ir.DataType.FLOAT
    np_dtype = np.float64 if compute == ir.DataType.DOUBLE else np.float32
    if compute != dtype:  # half precision: accumulate in fp32 like the reference
        q, k, v = (op.Cast(x, to=compute) for x in (q, k, v))
    T = int(num_frames) if isinstance(num_frames, (int, np.integer)) else num_frames
    P = _div(_sub(_shape_of(q, 2), pre + suf), T)
    groups = _groups(global_frames, windows, H, T)
    outs, lses, order = [], [], []
    for key, heads in groups.items():
        sel = (lambda x: x) if len(heads) == H else (lambda x, i=_ints(heads): op.Gather(x, i, axis=1))
        qh, kh, vh = sel(q), sel(k), sel(v)
        if key == "dense":
            o, l = _dense_group(qh, kh, vh, scale)
        else:
            o, l = _sparse_group(qh, kh, vh, pre, suf, T, P, key[0], key[1], scale, np_dtype)
        outs.append(o)
        lses.append(l)
        order += heads
    out = op.Concat(*outs, axis=1) if len(outs) > 1 else outs[0]
    lse = op.Concat(*lses, axis=1) if len(lses) > 1 else lses[0]
    if order != list(range(H)):
        inverse = _ints(np.argsort(order))
        out, lse = op.Gather(out, inverse, axis=1), op.Gather(lse, inverse, axis=1)
    if compute != dtype:
        out = op.Cast(out, to=dtype)
    return out, lse


def custom_schema():
    """The ``vdit::TileAttention`` (version 1) operator schema, registered once with onnx.

    The exporter builds nodes from schemas; registering one for our own domain only adds an entry
    (no existing operator changes) so that the custom node is typed and checkable.
    """
    import onnx

    if onnx.defs.has(CUSTOM_OP, 1, CUSTOM_DOMAIN) if hasattr(onnx.defs, "has") else False:
        return onnx.defs.get_schema(CUSTOM_OP, 1, CUSTOM_DOMAIN)
    S = onnx.defs.OpSchema
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
    schema = S(
        CUSTOM_OP, CUSTOM_DOMAIN, 1,
        doc="Tile attention (vdit-compile): see docs/export.md",
        inputs=[S.FormalParameter("q", "T"), S.FormalParameter("k", "T"), S.FormalParameter("v", "T"),
                S.FormalParameter("num_frames", "tensor(int64)")],
        outputs=[S.FormalParameter("out", "T"), S.FormalParameter("lse", "L")],
        type_constraints=[("T", floats, "q/k/v/out"), ("L", ["tensor(float)", "tensor(double)"], "lse")],
        attributes=[S.Attribute("text_prefix", S.AttrType.INT, "text tokens before the video tokens"),
                    S.Attribute("text_suffix", S.AttrType.INT, "text tokens after the video tokens"),
                    S.Attribute("global_frames", S.AttrType.INTS, "per head g (-1: dense head)"),
                    S.Attribute("windows", S.AttrType.INTS, "per head w"),
                    S.Attribute("scale", S.AttrType.FLOAT, "softmax scale")],
    )
    onnx.defs.register_schema(schema)
    return schema


def tile_attention_custom_node(q, k, v, text_prefix, text_suffix, num_frames, global_frames, windows, scale):
    """Translation emitting one ``vdit.TileAttention`` node (custom domain, for fused-kernel runtimes).

    Inputs ``q, k, v`` ``(B, H, L, D)`` and ``num_frames`` (int64, shape ``(1,)``, so it may be
    dynamic); attributes ``text_prefix``, ``text_suffix``, ``global_frames``, ``windows`` (ints, one
    per head or one for all; ``-1`` = dense head) and ``scale``; outputs ``out`` and ``lse``
    (float32, float64 for float64 inputs).
    """
    from onnxscript import values

    custom_schema()
    vdit = values.Opset(CUSTOM_DOMAIN, 1)
    out, lse = vdit.TileAttention(
        q, k, v, _dim(num_frames),
        text_prefix=_static(text_prefix, "text_prefix"), text_suffix=_static(text_suffix, "text_suffix"),
        global_frames=[_static(g, "global_frames") for g in global_frames],
        windows=[_static(w, "windows") for w in windows], scale=float(scale),
    )
    return out, lse
