"""``vdit::tile_attention`` written with plain ATen ops, for backends that have no converter for the op.

Same exact algorithm as the ONNX translation (:mod:`.onnx_attention`), from the same gather plan
(:func:`.unit_bands.unit_bands`: any registered mask family, through its unit mask): per group of heads
sharing a unit mask, full rows attend to every key; every other query unit scores against the shared
key block (text + units every such row keeps) and its gathered band of kept key units (``-inf`` on
padding), one softmax over both; a constant gather restores the model's token order.  Only
``index_select``/``index``/``cat``/``matmul``/``logsumexp``/``exp`` are used, so TensorRT (through
torch-tensorrt's dynamo converters) can build it without a plugin, and no ``L x L`` tensor is formed
for a sparse head group.  The gather indices are constants: a decomposition table cannot create
constant tensors (``run_decompositions`` refuses them), so :func:`decompose_tile_attention` replaces each
op call by a small module holding them as buffers and re-exports the program.  The grid must be static
(a fixed frame count).
"""
from __future__ import annotations

import torch

from .unit_bands import GroupBands, unit_bands


def _attend(s: torch.Tensor):
    lse = torch.logsumexp(s, dim=-1)
    return torch.exp(s - lse.unsqueeze(-1)), lse


def _dense(q, k, v, scale):
    p, lse = _attend((q @ k.transpose(-1, -2)) * scale)
    return p @ v, lse


_INDEX_FIELDS = ("full_rows", "band_rows", "shared_keys", "band_keys", "band_keep", "inverse")


def group_tensors(gb: GroupBands, unit_keys, device=None) -> dict[str, torch.Tensor]:
    """The group's gather indices as tensors (``unit_keys``: the call's ``(N, U)`` key positions)."""
    out = {f: torch.as_tensor(getattr(gb, f), device=device) for f in _INDEX_FIELDS}
    out["band_rows"] = out["band_rows"].reshape(-1)
    out["unit_keys"] = torch.as_tensor(unit_keys.reshape(-1), device=device)
    return out


def _sparse(q, k, v, gb: GroupBands, t: dict, scale: float):
    B, H, _, D = q.shape
    Dv = v.shape[-1]
    R, U = gb.band_rows.shape
    full_out, full_lse = _dense(q.index_select(2, t["full_rows"]), k, v, scale)
    rq = q.index_select(2, t["band_rows"]).reshape(B, H, R, U, D)
    scores, vals = [], []
    if gb.shared_keys.size:
        idx = t["shared_keys"]
        scores.append(rq @ k.index_select(2, idx).unsqueeze(2).transpose(-1, -2) * scale)
        vals.append(v.index_select(2, idx).unsqueeze(2))
    K = gb.band_width
    if K:
        uk, sel = t["unit_keys"], t["band_keys"]
        N = uk.shape[0] // U
        bk = k.index_select(2, uk).reshape(B, H, N, U, D)[:, :, sel].reshape(B, H, R, K * U, D)
        bv = v.index_select(2, uk).reshape(B, H, N, U, Dv)[:, :, sel].reshape(B, H, R, K * U, Dv)
        keep = t["band_keep"].repeat_interleave(U, dim=1)  # (R, K*U)
        zero = torch.zeros((), dtype=q.dtype, device=q.device)
        bias = torch.where(keep, zero, torch.full_like(zero, float("-inf")))
        scores.append(rq @ bk.transpose(-1, -2) * scale + bias[:, None, :])
        vals.append(bv)
    p, lse = _attend(torch.cat(scores, dim=-1))
    out, start = 0, 0
    for vals_i in vals:
        width = vals_i.shape[-2]
        out = out + p[..., start:start + width] @ vals_i
        start += width
    inv = t["inverse"]
    out = torch.cat([full_out, out.reshape(B, H, R * U, Dv)], dim=2).index_select(2, inv)
    lse = torch.cat([full_lse, lse.reshape(B, H, R * U)], dim=2).index_select(2, inv)
    return out, lse


def _take_heads(x: torch.Tensor, heads) -> torch.Tensor:
    # slices, not a list index: an index list would become a lifted constant tensor in run_decompositions
    return torch.cat([x[:, h:h + 1] for h in heads], dim=1)


def _run(plan, tensors, q, k, v, scale):
    H = q.shape[1]
    dtype = q.dtype
    if dtype not in (torch.float32, torch.float64):  # accumulate half precision in fp32, like the reference
        q, k, v = q.float(), k.float(), v.float()
    outs, lses, order = [], [], []
    for gb, t in zip(plan.groups, tensors):
        heads = list(gb.heads)
        sel = (lambda x: x) if len(heads) == H else (lambda x, i=heads: _take_heads(x, i))
        qh, kh, vh = sel(q), sel(k), sel(v)
        o, l = _dense(qh, kh, vh, scale) if gb.dense else _sparse(qh, kh, vh, gb, t, scale)
        outs.append(o)
        lses.append(l)
        order += heads
    out, lse = torch.cat(outs, dim=1), torch.cat(lses, dim=1)
    if order != list(range(H)):
        inverse = [order.index(h) for h in range(H)]
        out, lse = _take_heads(out, inverse), _take_heads(lse, inverse)
    return out.to(dtype), lse


def band_tile_attention(q, k, v, text_prefix, text_suffix, grid, masks, scale):
    """Exact ``(out, lse)`` of ``vdit::tile_attention`` from ATen ops (see module doc); eager use."""
    plan = unit_bands(q.shape[1], q.shape[2], text_prefix, text_suffix, grid, masks)
    tensors = [group_tensors(gb, plan.unit_keys, q.device) for gb in plan.groups]
    return _run(plan, tensors, q, k, v, float(scale))


class BandAttention(torch.nn.Module):
    """One op call's decomposition, its gather indices held as (non-persistent) buffers."""

    def __init__(self, num_heads: int, seq_len: int, text_prefix, text_suffix, grid, masks: str, scale: float):
        super().__init__()
        self.plan = unit_bands(num_heads, seq_len, text_prefix, text_suffix, grid, masks)
        self.scale = float(scale)
        self.names = []
        for i, gb in enumerate(self.plan.groups):
            names = {}
            for key, t in group_tensors(gb, self.plan.unit_keys).items():
                self.register_buffer(f"g{i}_{key}", t, persistent=False)
                names[key] = f"g{i}_{key}"
            self.names.append(names)

    def forward(self, q, k, v):
        tensors = [{key: getattr(self, n) for key, n in names.items()} for names in self.names]
        return _run(self.plan, tensors, q, k, v, self.scale)


def decompose_tile_attention(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The program with every ``vdit::tile_attention`` replaced by :class:`BandAttention`'s ATen ops.

    The program is unlifted, each op call becomes a call of a :class:`BandAttention` submodule, and the
    result is exported again on the program's example inputs (static shapes) and decomposed.
    """
    gm = ep.module()
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.vdit.tile_attention.default:
            continue
        q, k, v, pre, suf, grid, masks, scale = node.args
        qv = q.meta["val"]
        name = f"tile_band_attention_{count}"
        count += 1
        gm.add_submodule(name, BandAttention(int(qv.shape[1]), qv.shape[2], pre, suf, grid, masks, scale).to(qv.device))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (q, k, v))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    if ep.example_inputs is None:
        raise ValueError("decompose_tile_attention needs an ExportedProgram with example inputs")
    args, kwargs = ep.example_inputs
    return torch.export.export(gm, tuple(args), dict(kwargs)).run_decompositions(torch.export.default_decompositions())
