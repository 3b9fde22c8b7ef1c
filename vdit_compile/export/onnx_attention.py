"""ONNX translation of ``torch.ops.vdit.tile_attention`` into standard ONNX operators.

The exporter (``torch.onnx.export(..., dynamo=True)``) calls :func:`tile_attention_onnx` through
``custom_translation_table`` with the op's tensors as ONNX values and its ``grid`` (ints) and ``masks``
(string) as Python values, so the sparsity pattern is known while the graph is built.  Any ONNX
runtime can run the result; no custom kernel is needed.

Static grid (any registered mask family): the gather plan of :mod:`.unit_bands`, built from the heads'
unit masks: per group of heads sharing a unit mask, full rows (text, units that keep everything) attend
to every key; every other query unit scores against one shared key block (text + key units every such
row keeps) and a gathered band of its other kept key units (``-inf`` bias on padding); the two blocks
share one softmax without being concatenated (common row maximum, summed exponentials, one division);
a constant ``Gather`` restores the model's token order (undoing the tile reorder).  Exact, never an
``L x L`` tensor for a sparse head group, and the log-sum-exp (the op's second output) is exact too.

Symbolic frame count (``--dynamic-frames``): the frame tile family's band rule is written in ONNX ops
(indices from ``Range``, exact for every ``T > g``, :func:`_sparse_group`); other families need the unit
grid, so they are refused with a clear error (export them with a fixed frame count).

:func:`tile_attention_custom_node` instead emits one ``vdit.TileAttention`` node (custom domain) for
runtimes that provide a fused kernel; see docs/export.md for its contract.
"""
from __future__ import annotations

import numpy as np
from onnxscript import ir
from onnxscript.onnx_opset import opset18 as op

from ..masks.base import parse_mask
from ..masks.tile import TileMask
from .unit_bands import GroupBands, unit_bands

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
    """Band gather indices ``(T-g, 2w+1)`` and additive bias ``(T-g, 2w+1)`` (0 kept, -inf dropped) for a
    symbolic frame count ``T`` (computed in-graph)."""
    offsets = np.arange(-w, w + 1)
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


def _merge_blocks(blocks: list, vals: list):
    """Softmax over key blocks scored separately (scaled scores ``blocks[i]`` against values ``vals[i]``):
    one shared maximum, then ``(out, lse)`` as if the blocks were one row (lse keeps its last axis of 1)."""
    maxima = [op.ReduceMax(b, _ints([-1]), keepdims=1) for b in blocks]
    m = op.Max(*maxima) if len(maxima) > 1 else maxima[0]
    exps = [op.Exp(op.Sub(b, m)) for b in blocks]
    sums = [op.ReduceSum(e, _ints([-1]), keepdims=1) for e in exps]
    total = op.Sum(*sums) if len(sums) > 1 else sums[0]
    parts = [op.MatMul(e, vals_i) for e, vals_i in zip(exps, vals)]
    return op.Div(op.Sum(*parts) if len(parts) > 1 else parts[0], total), op.Add(op.Log(total), m)


def _sparse_group(q, k, v, pre: int, suf: int, T, P, g: int, w: int, scale: float, np_dtype):
    """Exact frame tile attention ``(g, w)`` of one head group under a symbolic frame count ``T``: full rows
    (text, global frames) attend to everything; frame ``f >= g`` to text, global keys and frames ``f-w..f+w``."""
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
    out, lse = _merge_blocks(blocks, vals)
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


def _gather_const(x: ir.Value, idx: np.ndarray, axis: int) -> ir.Value:
    return op.Gather(x, op.Constant(value=ir.tensor(np.ascontiguousarray(idx, dtype=np.int64))), axis=axis)


def _unit_group(q, k, v, gb: GroupBands, unit_keys: np.ndarray, scale: float, np_dtype):
    """Exact attention of one sparse head group from its gather plan (:mod:`.unit_bands`)."""
    D, Dv = _shape_of(q, 3), _shape_of(v, 3)
    R, U = gb.band_rows.shape
    full_out, full_lse = _dense_group(_gather_const(q, gb.full_rows, 2), k, v, scale)
    rq = op.Reshape(_gather_const(q, gb.band_rows.reshape(-1), 2), _cat_dims(0, 0, R, U, D))  # (B, h, R, U, D)
    keys, vals, biases = [], [], []
    if gb.shared_keys.size:  # text + shared units, one block for every band row: (B, h, 1, S, D)
        keys.append(op.Unsqueeze(_gather_const(k, gb.shared_keys, 2), _ints([2])))
        vals.append(op.Unsqueeze(_gather_const(v, gb.shared_keys, 2), _ints([2])))
        biases.append(None)
    K = gb.band_width
    if K:  # gathered key units per band row: (B, h, R, K*U, D) with -inf on padding
        N = unit_keys.shape[0]
        flat = unit_keys.reshape(-1)
        ku = op.Reshape(_gather_const(k, flat, 2), _cat_dims(0, 0, N, U * D if isinstance(D, int) else -1))
        vu = op.Reshape(_gather_const(v, flat, 2), _cat_dims(0, 0, N, U * Dv if isinstance(Dv, int) else -1))
        keys.append(op.Reshape(_gather_const(ku, gb.band_keys, 2), _cat_dims(0, 0, R, K * U, D)))
        vals.append(op.Reshape(_gather_const(vu, gb.band_keys, 2), _cat_dims(0, 0, R, K * U, Dv)))
        bias = np.where(np.repeat(gb.band_keep, U, axis=1), 0.0, -np.inf).astype(np_dtype)[:, None, :]  # (R, 1, K*U)
        biases.append(op.Constant(value=ir.tensor(bias)))
    # one softmax over the column blocks [shared | band] without concatenating them: shared row max,
    # summed exponentials, one division at the end (exact; avoids copying the score blocks)
    sc = None
    blocks = []
    for kk, bias in zip(keys, biases):
        s = op.MatMul(rq, op.Transpose(kk, perm=[0, 1, 2, 4, 3]))
        if sc is None:
            sc = op.CastLike(op.Constant(value_float=float(scale)), s)
        s = op.Mul(s, sc)
        blocks.append(s if bias is None else op.Add(s, bias))
    out, lse = _merge_blocks(blocks, vals)
    out = op.Concat(full_out, op.Reshape(out, _cat_dims(0, 0, R * U, Dv)), axis=2)
    lse = op.Concat(full_lse, op.Reshape(lse, _cat_dims(0, 0, R * U)), axis=2)
    return _gather_const(out, gb.inverse, 2), _gather_const(lse, gb.inverse, 2)


def _static_groups(q, pre, suf, grid, masks: str, H: int, scale: float, np_dtype):
    """``[(heads, fn(qh, kh, vh) -> (out, lse))]`` from the unit masks of a static grid."""
    L = _shape_of(q, 2)
    if not isinstance(L, int):
        raise NotImplementedError(f"vdit.tile_attention export with a static grid {list(grid)} needs a static "
                                  f"sequence length, found {L!r}")
    plan = unit_bands(H, L, pre, suf, grid, masks)
    out = []
    for gb in plan.groups:
        if gb.dense:
            out.append((list(gb.heads), lambda qh, kh, vh: _dense_group(qh, kh, vh, scale)))
        else:
            out.append((list(gb.heads), lambda qh, kh, vh, gb=gb: _unit_group(qh, kh, vh, gb, plan.unit_keys,
                                                                             scale, np_dtype)))
    return out


def _dynamic_groups(pre, suf, grid, masks: str, H: int, scale: float, np_dtype):
    """Frame tile heads under a symbolic frame count: the in-graph band of :func:`_sparse_group`.

    Only the frame tile family has a rule written in ONNX ops (band indices from ``Range``); any other
    family needs a static grid: export it with a fixed frame count.
    """
    specs = [parse_mask(n) for n in masks.split(",")]
    specs = specs * H if len(specs) == 1 else specs
    if len(specs) != H:
        raise ValueError(f"vdit.tile_attention: {len(specs)} masks for {H} heads: {masks!r}")
    others = sorted({s.name for s in specs if not isinstance(s, TileMask)})
    if others:
        raise NotImplementedError(
            f"vdit.tile_attention export with a dynamic frame count supports the frame tile family only; masks "
            f"{', '.join(others)} need a static grid: export with a fixed frame count")
    T = grid[0]
    H_, W_ = (_static(x, "grid") for x in grid[1:3])
    groups: dict = {}
    for h, s in enumerate(specs):
        groups.setdefault("dense" if s.dense else (s.global_frames, s.window), []).append(h)
    out = []
    for key, heads in groups.items():
        if key == "dense":
            out.append((heads, lambda qh, kh, vh: _dense_group(qh, kh, vh, scale)))
        else:
            out.append((heads, lambda qh, kh, vh, key=key: _sparse_group(
                qh, kh, vh, pre, suf, T, H_ * W_, key[0], key[1], scale, np_dtype)))
    return out


def tile_attention_onnx(q, k, v, text_prefix, text_suffix, grid, masks, scale):
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
    grid = list(grid)
    if all(isinstance(x, (int, np.integer)) for x in grid):
        groups = _static_groups(q, pre, suf, [int(x) for x in grid], masks, H, float(scale), np_dtype)
    else:
        groups = _dynamic_groups(pre, suf, grid, masks, H, float(scale), np_dtype)
    outs, lses, order = [], [], []
    for heads, fn in groups:
        sel = (lambda x: x) if len(heads) == H else (lambda x, i=_ints(heads): op.Gather(x, i, axis=1))
        o, l = fn(sel(q), sel(k), sel(v))
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
                    S.Attribute("grid", S.AttrType.INTS, "[T, H, W, tile_h, tile_w] (T as traced; the input wins)"),
                    S.Attribute("masks", S.AttrType.STRING, "one mask name or one per head, comma-separated"),
                    S.Attribute("scale", S.AttrType.FLOAT, "softmax scale")],
    )
    onnx.defs.register_schema(schema)
    return schema


def tile_attention_custom_node(q, k, v, text_prefix, text_suffix, grid, masks, scale):
    """Translation emitting one ``vdit.TileAttention`` node (custom domain, for fused-kernel runtimes).

    Inputs ``q, k, v`` ``(B, H, L, D)`` and ``num_frames`` (int64, shape ``(1,)``, so it may be
    dynamic); attributes ``text_prefix``, ``text_suffix``, ``grid`` (ints ``[T, H, W, tile_h, tile_w]``,
    the traced ``T`` or 0 when dynamic: the ``num_frames`` input is authoritative), ``masks`` (the op's
    string: one mask name of any registered family, or one per head, comma-separated) and ``scale``;
    outputs ``out`` and ``lse`` (float32, float64 for float64 inputs).
    """
    from onnxscript import values

    custom_schema()
    vdit = values.Opset(CUSTOM_DOMAIN, 1)
    grid = list(grid)
    T = grid[0]
    attr_grid = [int(T) if isinstance(T, (int, np.integer)) else 0] + [_static(x, "grid") for x in grid[1:]]
    out, lse = vdit.TileAttention(
        q, k, v, _dim(T),
        text_prefix=_static(text_prefix, "text_prefix"), text_suffix=_static(text_suffix, "text_suffix"),
        grid=attr_grid, masks=str(masks), scale=float(scale),
    )
    return out, lse
