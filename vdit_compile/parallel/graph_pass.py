"""Graph pass: run a captured video DiT sequence-parallel, sharded by frames.

On a Dynamo FX graph (after the tile rewrite), the pass

1. finds the first token tensor of the video (the patch embedding's output: the earliest
   ancestor of the first attention's queries that descends from a non-parameter input and
   has one dimension of ``T * P`` tokens) and narrows it to this rank's frames;
2. propagates that frame sharding through every later operation (:mod:`.shard_rules`):
   views and permutations move it, pointwise ops and linears keep it, full-size
   position-dependent operands (RoPE tables, positional embeddings) are sliced to the local
   frames where they meet sharded values, text slices of joint sequences become replicated;
3. rewrites every ``vdit::tile_attention`` (and unrewritten self-attention SDPA on sharded
   q/k/v, as a dense tile) to :func:`~.attention.parallel_tile_attention`; cross-attention
   (sharded queries, replicated text keys) needs no communication and is left as is;
4. all-gathers sharded graph outputs.

Anything it cannot map exactly (an op that mixes frames, a reshape across the frame dim,
symbolic shapes) raises :class:`~.shard_rules.Unshardable`; :func:`shard_graph` then returns
the graph unchanged with a warning.  Shapes are tracked with fake tensors.
"""
from __future__ import annotations

import operator
import warnings

import torch
import torch.fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from ..kinds import TILEABLE_KINDS
from ..layout import TokenLayout
from ..passes.registry import register_pass
from .attention import gather_tokens, parallel_tile_attention, shard_tokens
from .shard_rules import Shard, Unshardable, map_getitem, map_permute, map_view
from .ulysses import check_heads

_VIEW = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"}
_PERMUTE = {"permute", "transpose", "movedim", "swapaxes", "swapdims", "t", "mT", "moveaxis"}
_POINTWISE = {
    "add", "sub", "mul", "truediv", "div", "pow", "neg", "exp", "sin", "cos", "tanh", "sigmoid", "silu", "gelu", "relu",
    "float", "half", "bfloat16", "double", "to", "type_as", "contiguous", "clone", "dropout", "where", "clamp", "rsqrt",
    "sqrt", "abs", "erf", "square", "reciprocal", "log", "mish", "leaky_relu", "addcmul", "lerp", "masked_fill", "detach",
    "floordiv", "mod", "sign", "exp2", "log1p", "expm1", "softplus", "hardtanh", "iadd", "imul", "isub", "itruediv",
    "add_", "mul_", "sub_", "div_", "clamp_", "copy_", "requires_grad_", "maximum", "minimum", "fill_", "zero_",
}
_LIKE = {"empty_like", "zeros_like", "ones_like", "full_like", "randn_like", "new_zeros", "new_empty", "new_ones"}
_REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "norm", "var", "std", "prod", "logsumexp"}
_SPLIT = {"chunk", "split", "unbind", "tensor_split", "split_with_sizes"}


def _name(node) -> str:
    t = node.target
    if node.op == "call_method":
        return t
    if isinstance(t, torch._ops.OpOverload) or isinstance(t, torch._ops.OpOverloadPacket):
        return str(t)
    return getattr(t, "__name__", str(t))


def _is_tile(node) -> bool:
    return node.op == "call_function" and "vdit.tile_attention" in str(node.target) and "backward" not in str(node.target)


def _is_sdpa(node) -> bool:
    return node.op == "call_function" and _name(node) == "scaled_dot_product_attention"


def _val(node):
    return node.meta.get("val", node.meta.get("example_value")) if isinstance(node, torch.fx.Node) else node


class _Walker:
    def __init__(self, gm: torch.fx.GraphModule, parallel, T: int, P: int):
        self.gm, self.g, self.par, self.T, self.P = gm, gm.graph, parallel, T, P
        self.n = parallel.local_frames(T)[1]
        self.shard: dict[torch.fx.Node, object] = {}  # Shard, tuple of Shard/None, or absent
        self.local: dict[torch.fx.Node, tuple] = {}  # local shape of sharded tensor nodes
        self.shard_fn = _bind(shard_tokens, parallel)

    # ---- helpers -------------------------------------------------------------------------
    def gshape(self, node):
        v = _val(node)
        if not isinstance(v, torch.Tensor):
            raise Unshardable(f"{node.name}: no tensor shape recorded")
        if any(not isinstance(s, int) for s in v.shape):
            raise Unshardable(f"{node.name}: symbolic shape {tuple(v.shape)} (dynamic shapes are not sharded)")
        return tuple(v.shape)

    def set(self, node, shard, local_shape=None):
        self.shard[node] = shard
        if isinstance(shard, Shard):
            if local_shape is None:
                local_shape = list(self.gshape(node))
                local_shape[shard.dim] = shard.local(self.n)
            self.local[node] = tuple(local_shape)

    def localize(self, before, arg, s: Shard, dim: int):
        """Insert ``shard_tokens(arg)`` so a full-size operand lines up with a sharded one."""
        with self.g.inserting_before(before):
            new = self.g.call_function(self.shard_fn, (arg, dim, s.pre, s.suf, self.T))
        new.meta["val"] = _val(arg)
        self.set(new, s.at(dim))
        return new

    # ---- entry ---------------------------------------------------------------------------
    def run(self, start: torch.fx.Node, dim: int):
        with self.g.inserting_after(start):
            narrowed = self.g.call_function(self.shard_fn, (start, dim, 0, 0, self.T))
        start.replace_all_uses_with(narrowed, delete_user_cb=lambda u: u is not narrowed)
        narrowed.meta["val"] = _val(start)
        self.set(narrowed, Shard(dim, 0, 0, self.gshape(start)[dim] // self.T))
        for node in list(self.g.nodes):
            if node is narrowed or node.op in ("placeholder", "get_attr") or node in self.shard:
                continue
            if node.op == "output":
                self.gather_outputs(node)
                continue
            ins = [a for a in node.all_input_nodes if a in self.shard and self.shard[a] is not None]
            if ins:
                self.visit(node, ins)

    def gather_outputs(self, node):
        def fix(a):
            s = self.shard.get(a) if isinstance(a, torch.fx.Node) else None
            if s is None:
                return a
            if not isinstance(s, Shard):
                raise Unshardable(f"graph output {a.name} is a tuple holding sharded values")
            with self.g.inserting_before(node):
                return self.g.call_function(_bind(gather_tokens, self.par), (a, s.dim, s.pre, s.suf, self.T))
        node.args = torch.fx.node.map_arg(node.args, fix)

    # ---- per-op rules --------------------------------------------------------------------
    def visit(self, node, ins):
        name = _name(node)
        s = self.shard[ins[0]]
        if _is_tile(node):
            return self.attention(node, tile=True)
        if _is_sdpa(node):
            return self.attention(node, tile=False)
        if name == "getitem" and not isinstance(_val(node.args[0]), torch.Tensor):
            parts = self.shard[node.args[0]]
            return self.set(node, parts[node.args[1]])
        if not isinstance(s, Shard):
            raise Unshardable(f"{node.name} ({name}) consumes a tuple holding sharded values")
        if len(ins) > 1 and name not in _POINTWISE | {"cat", "stack", "setitem", "type_as", "view_as", "reshape_as"}:
            raise Unshardable(f"{node.name} ({name}) combines several frame-sharded values")
        if name in ("type_as", "to", "float", "half", "bfloat16", "double", "contiguous", "clone", "detach"):
            if self.shard.get(node.args[0]) is None:
                return self.shard.__setitem__(node, None)  # only takes the dtype of a sharded value
            return self.set(node, self.shard[node.args[0]])
        if name in _VIEW or name == "expand":
            return self.view(node, s, name)
        if name in _PERMUTE or name in ("squeeze", "unsqueeze"):
            if node.args[0] is not ins[0]:
                raise Unshardable(f"{node.name} ({name}) with a sharded argument other than its input")
            fn = (lambda t: getattr(t, name)(*node.args[1:], **node.kwargs)) if node.op == "call_method" else (
                lambda t: node.target(t, *node.args[1:], **node.kwargs))
            return self.set(node, map_permute(s, self.gshape(node.args[0]), fn))
        if name == "getitem":
            new_idx, out = map_getitem(s, node.args[1], len(self.gshape(node.args[0])), self.T, self.n)
            node.args = (node.args[0], new_idx)
            return self.set(node, out)
        if name == "setitem":
            return self.setitem(node, s)
        if name in _SPLIT:
            return self.split(node, s, name)
        if name in ("cat", "stack", "concat", "concatenate"):
            return self.cat(node, name)
        if name in _REDUCE or name in ("softmax", "log_softmax", "cumsum"):
            dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            dims = [dims] if isinstance(dims, int) else dims
            nd = len(self.gshape(node.args[0]))
            if dims is None or s.dim in [d % nd for d in dims]:
                raise Unshardable(f"{node.name} ({name}) reduces over the frame-sharded dim")
            if name in _REDUCE and not node.kwargs.get("keepdim", False):
                return self.set(node, s.at(s.dim - sum(1 for d in dims if d % nd < s.dim)))
            return self.set(node, s)
        if name in ("linear", "layer_norm", "rms_norm", "normalize"):
            nd = len(self.gshape(node.args[0]))
            if node.args[0] is not ins[0] or s.dim >= nd - 1:
                raise Unshardable(f"{node.name} ({name}) acts along the frame-sharded dim")
            return self.set(node, s)
        if name in _LIKE:
            if name.startswith("new_"):
                raise Unshardable(f"{node.name} ({name}) builds a tensor of a fixed size from a sharded one")
            return self.set(node, s)
        if name in _POINTWISE:
            return self.pointwise(node, name)
        raise Unshardable(f"{node.name}: no frame-sharding rule for {name!r}")

    def view(self, node, s, name):
        x = node.args[0]
        gin, gout = self.gshape(x), self.gshape(node)
        if name == "expand":
            out = s.at(len(gout) - len(gin) + s.dim)
            local = list(gout)
            local[out.dim] = out.local(self.n)
            node.target, node.op, node.args, node.kwargs = "expand", "call_method", (x, *local), {}
            return self.set(node, out, local)
        out, local = map_view(s, gin, gout, self.T, self.n)
        node.target, node.op, node.args, node.kwargs = "reshape", "call_method", (x, *local), {}
        self.set(node, out, local)

    def pointwise(self, node, name):
        gout = self.gshape(node)
        nd = len(gout)
        target_shard = None
        for a in node.all_input_nodes:
            s = self.shard.get(a)
            if isinstance(s, Shard):
                cand = s.at(nd - len(self.gshape(a)) + s.dim)
                if target_shard is not None and cand != target_shard:
                    raise Unshardable(f"{node.name} ({name}) combines values sharded differently")
                target_shard = cand
        if name in ("type_as", "to") and node.args and self.shard.get(node.args[0]) is None:
            return self.shard.__setitem__(node, None)  # dtype only from a sharded value

        def fix(a):
            if not isinstance(a, torch.fx.Node) or a in self.shard and self.shard[a] is not None:
                return a
            v = _val(a)
            if not isinstance(v, torch.Tensor) or v.dim() == 0:
                return a
            pos = target_shard.dim - (nd - v.dim())
            if pos < 0 or v.shape[pos] == 1:
                return a
            if v.shape[pos] != target_shard.full(self.T):
                raise Unshardable(f"{node.name} ({name}): operand {a.name} of shape {tuple(v.shape)} does not line up with frames")
            return self.localize(node, a, target_shard, pos)

        if name not in ("type_as", "to"):
            node.args = torch.fx.node.map_arg(node.args, fix)
            node.kwargs = torch.fx.node.map_arg(node.kwargs, fix)
        self.set(node, target_shard)

    def setitem(self, node, s):
        x, idx, val = node.args
        if self.shard.get(x) is None:
            raise Unshardable(f"{node.name}: writes frame-sharded values into an unsharded tensor")
        new_idx, out = map_getitem(s, idx, len(self.gshape(x)), self.T, self.n)
        vs = self.shard.get(val) if isinstance(val, torch.fx.Node) else None
        vv = _val(val) if isinstance(val, torch.fx.Node) else None
        if out is None:
            if vs is not None:
                raise Unshardable(f"{node.name}: writes frame-sharded values into text positions")
        elif vs is None:
            if isinstance(vv, torch.Tensor) and vv.dim() > 0:
                raise Unshardable(f"{node.name}: writes replicated values into frame-sharded positions")
        elif vs.pre != out.pre or vs.suf != out.suf or vs.unit != out.unit:
            raise Unshardable(f"{node.name}: writes values sharded differently from the positions they fill")
        node.args = (x, new_idx, val)
        self.shard[node] = None

    def split(self, node, s, name):
        x = node.args[0]
        nd = len(self.gshape(x))
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
        if name == "unbind":
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        dim %= nd
        if dim == s.dim:
            return self.split_frames(node, s, name, dim)
        out = s.at(s.dim - 1) if name == "unbind" and dim < s.dim else s
        k = len(_val(node))
        self.shard[node] = tuple([out] * k)

    def split_frames(self, node, s, name, dim):
        """``split([sizes], dim)`` along the sharded dim, cutting only at text/video boundaries."""
        sizes = node.kwargs.get("split_size_or_sections", node.kwargs.get("split_size", node.args[1] if len(node.args) > 1 else None))
        if name not in ("split", "split_with_sizes") or not isinstance(sizes, (list, tuple)):
            raise Unshardable(f"{node.name} ({name}) splits along the frame-sharded dim")
        outs, local, start = [], [], 0
        for size in sizes:
            _, sh = map_getitem(s, tuple([slice(None)] * dim + [slice(start, start + size)]), dim + 1, self.T, self.n)
            local.append(sh.local(self.n) if sh is not None else size)
            outs.append(sh)
            start += size
        node.target, node.op, node.kwargs = "split", "call_method", {}
        node.args = (node.args[0], local, dim)
        self.shard[node] = tuple(outs)

    def cat(self, node, name):
        tensors = node.args[0]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        nd = len(self.gshape(tensors[0]))
        dim %= nd if name != "stack" else nd + 1
        shards = [self.shard.get(t) for t in tensors]
        sharded = [s for s in shards if s is not None]
        if name == "stack":
            if any(s != sharded[0] for s in sharded) or len(sharded) != len(tensors):
                raise Unshardable(f"{node.name}: stack of sharded and unsharded values")
            return self.set(node, sharded[0].at(sharded[0].dim + (dim <= sharded[0].dim)))
        s0 = sharded[0]
        if dim != s0.dim:
            new = [t if self.shard.get(t) is not None else self.localize(node, t, s0, s0.dim) for t in tensors]
            node.args = (new, *node.args[1:])
            return self.set(node, s0)
        if len(sharded) != 1:
            raise Unshardable(f"{node.name}: concatenates several frame-sharded values along the frame dim")
        i = shards.index(s0)
        pre = sum(self.gshape(t)[dim] for t in tensors[:i]) + s0.pre
        suf = sum(self.gshape(t)[dim] for t in tensors[i + 1 :]) + s0.suf
        self.set(node, Shard(dim, pre, suf, s0.unit))

    def attention(self, node, tile: bool):
        args = list(node.args)
        kw = dict(node.kwargs)
        q, k, v = _qkv(node)
        sq, sk, sv = (self.shard.get(t) for t in (q, k, v))
        if not isinstance(sq, Shard) or sq.dim % 4 != 2 or len(self.gshape(q)) != 4:
            raise Unshardable(f"{node.name}: attention whose queries are not frame-sharded along the sequence dim")
        if sk is None and sv is None and not tile:
            return self.set(node, sq)  # cross-attention: replicated keys, local queries, no traffic
        if sk != sq or sv != sq or sq.unit != self.P:
            raise Unshardable(f"{node.name}: attention with queries and keys sharded differently")
        if tile:
            _, _, _, pre, suf, grid, masks, scale = args
            grid = list(grid)
            if not all(isinstance(x, int) for x in grid) or len(grid) != 5:
                raise Unshardable(f"{node.name}: tile grid {grid} is not known when the graph is built")
            if (pre, suf, grid[0], grid[1] * grid[2]) != (sq.pre, sq.suf, self.T, self.P):
                raise Unshardable(f"{node.name}: tile layout ({pre}, {suf}, {grid}) differs from the sharded tokens")
        else:
            extra = args[3:]
            mask = kw.get("attn_mask", extra[0] if extra else None)
            if mask is not None or kw.get("is_causal", False) or kw.get("dropout_p", 0.0) or kw.get("enable_gqa", False):
                raise Unshardable(f"{node.name}: self-attention with a mask, dropout, causal or GQA")
            scale = kw.get("scale") or self.gshape(q)[-1] ** -0.5
            grid, masks = [self.T, self.P, 1, self.P, 1], "dense"  # whole frames of P tokens, every key kept
        if self.par.mode == "ulysses":
            check_heads(self.gshape(q)[1], self.par.world_size)  # a clear error, not a silent fallback
        need_lse = any(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 1 for u in node.users) if tile else False
        fn = _site_fn(self.par, need_lse, tile)
        node.target, node.op = fn, "call_function"
        node.args, node.kwargs = (q, k, v, sq.pre, sq.suf, list(grid), masks, float(scale)), {}
        self.set(node, (sq, sq.at(2) if need_lse else None) if tile else sq)


def _bind(fn, parallel):
    """``fn`` with ``parallel`` as last argument, as a named function FX code can call."""

    def bound(*args):
        return fn(*args, parallel)

    bound.__name__ = bound.__qualname__ = f"vdit_{fn.__name__}"
    return bound


def _qkv(node):
    args = list(node.args)
    return tuple((args + [node.kwargs.get(n) for n in ("query", "key", "value")][len(args):])[:3])


def _site_fn(parallel, need_lse: bool, tile: bool):
    def vdit_parallel_attention(q, k, v, pre, suf, grid, masks, scale):
        out, lse = parallel_tile_attention(q, k, v, pre, suf, grid, masks, scale, parallel, need_lse)
        return (out, lse) if tile else out

    return vdit_parallel_attention


def _find_layout(gm, sites):
    found = set()
    for node in gm.graph.nodes:
        if _is_tile(node):
            L = tuple(_val(node.args[0]).shape)[2]
            pre, suf, grid = node.args[3:6]
            T = grid[0] if len(grid) else None
            if not all(isinstance(x, int) for x in (pre, suf, T, L)):
                raise Unshardable(f"{node.name}: text length or frames known only per call (trimmed by value); "
                                  f"such sites are not sharded")
            found.add((T, (L - pre - suf) // T))
    for site in sites or ():
        if isinstance(site, TokenLayout):  # a bare layout: the dense (unrewritten) case
            found.add((site.num_frames, site.frame_tokens))
            continue
        lay = getattr(site, "layout", None)
        if lay is not None and getattr(site, "kind", "") in TILEABLE_KINDS:
            found.add((lay.num_frames, lay.frame_tokens))
    if len(found) != 1:
        raise Unshardable(f"need one video token layout across attention sites, found {sorted(found) or 'none'}")
    return found.pop()


def _video_inputs(gm):
    return [n for n in gm.graph.nodes if n.op == "placeholder" and "_parameters_" not in n.name and "_buffers_" not in n.name]


def _start_node(gm, T, P):
    """Earliest ancestor of the first attention's queries holding one dim of T*P video tokens."""
    first = next((n for n in gm.graph.nodes if _is_tile(n) or _is_sdpa(n)), None)
    if first is None:
        raise Unshardable("no attention in the graph")
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    anc, stack = set(), [_qkv(first)[0]]
    while stack:
        a = stack.pop()
        if a not in anc:
            anc.add(a)
            stack.extend(a.all_input_nodes)
    inputs = [p for p in _video_inputs(gm) if p in anc and isinstance(_val(p), torch.Tensor) and _val(p).numel() >= T * P]
    desc = set(inputs)
    for n in gm.graph.nodes:
        if any(a in desc for a in n.all_input_nodes):
            desc.add(n)
    for n in sorted(anc & desc, key=order.get):
        v = _val(n)
        if isinstance(v, torch.Tensor) and n.op != "placeholder":
            dims = [i for i, s in enumerate(v.shape) if s == T * P]
            if len(dims) == 1:
                return n, dims[0]
    raise Unshardable(f"no tensor of {T} x {P} video tokens feeds the attention")


def shard_graph(gm: torch.fx.GraphModule, parallel, sites=None, example_inputs=None) -> torch.fx.GraphModule:
    """The graph sharded by frames for ``parallel``, or ``gm`` unchanged (with a warning) if unsafe."""
    if parallel is None or parallel.world_size == 1:
        return gm
    try:
        return _shard(gm, parallel, sites, example_inputs)
    except Unshardable as exc:
        warnings.warn(f"vdit-compile: sequence parallelism left this graph unsharded (each rank runs it whole): {exc}")
        return gm


def _shard(gm, parallel, sites, example_inputs):
    new_graph = torch.fx.Graph()
    out = new_graph.graph_copy(gm.graph, {})
    new_graph.output(out)
    new = torch.fx.GraphModule(gm, new_graph)
    if example_inputs is not None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        FakeTensorProp(new, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*example_inputs)
    T, P = _find_layout(new, sites)
    start, dim = _start_node(new, T, P)
    _Walker(new, parallel, T, P).run(start, dim)
    new.graph.lint()
    new.recompile()
    return new


def sequence_parallel_pass(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    """The registered pass (order 300, after the tile rewrite): shard applied graphs for ``ctx.parallel``."""
    par = getattr(ctx, "parallel", None)
    if par is None or par.world_size == 1 or getattr(ctx, "mode", "apply") != "apply":
        return gm
    new = shard_graph(gm, par, sites=getattr(ctx, "sites", None), example_inputs=getattr(ctx, "example_inputs", None))
    if new is not gm and hasattr(ctx, "needs_eager"):
        ctx.needs_eager = True  # the parallel attention calls collectives inductor does not trace
    return new


register_pass("sequence_parallel", 300)(sequence_parallel_pass)
