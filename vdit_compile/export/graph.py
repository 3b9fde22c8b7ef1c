"""Export-friendly form of the rewritten transformer: ``torch.export`` + the tile rewrite on ATen SDPA nodes.

``vdit_compile.optimize`` rewrites the Dynamo graph inside ``torch.compile``, which ``torch.export``
cannot trace.  Export therefore re-traces the *original* module with ``torch.export`` (non-strict,
falling back to strict for models whose forward builds tensors from constants) and applies the same
rewrite to the exported program: every ``aten.scaled_dot_product_attention`` node whose module path
(``nn_module_stack``) is a tiled site of the plan becomes ``vdit::tile_attention`` with the plan's
per-head masks (any registered family) and token tile: the op's ``grid = [T, H, W, tile_h, tile_w]`` and
``masks`` string.  The frame count of a site is ``(L - text) / (H*W)`` from the planned layout, so a
dynamic-frame export passes it as a symbolic int in ``grid`` and the op (and its ONNX translation, for
frame-level families) stay parametric in ``T``.  Step-aware sites export their top-level masks (one graph
serves every step; a warning says so).  Anything the rewrite cannot serve exactly raises :class:`ExportError`.
"""
from __future__ import annotations

import logging
import operator
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..layout import TokenLayout
from ..masks.base import MaskSpec
from ..ops.args import encode_masks, op_grid
from ..passes.naming import module_path
from .errors import DynamicFramesError, ExportError

log = logging.getLogger(__name__)

_SDPA = torch.ops.aten.scaled_dot_product_attention.default
#: name of the dynamic latent-frame dimension of a dynamic-frame export
FRAMES_DIM = "latent_frames"


@dataclass(frozen=True)
class SiteSpec:
    """What the rewrite needs for one site: planned layout (frame count free), per-head masks, token tile."""

    name: str
    layout: TokenLayout
    masks: tuple[MaskSpec, ...]
    tile: tuple[int, int] | None = None  # token tile of window families; None = whole frames

    @property
    def op_masks(self) -> str:
        """The op's ``masks`` argument."""
        return encode_masks(list(self.masks))

    @property
    def max_global(self) -> int:
        """Largest number of global frames of a frame tile head (the smallest dynamic frame count is one more)."""
        return max((getattr(m, "global_frames", 0) for m in self.masks if not m.dense), default=0)

    def op_grid(self, frames) -> list:
        """The op's ``grid`` argument with ``frames`` (an int, or a graph node for a dynamic export)."""
        return [frames] + op_grid(self.layout, self.tile)[1:]


def export_program(model: torch.nn.Module, example_inputs: Mapping, dynamic_shapes=None) -> torch.export.ExportedProgram:
    """``torch.export`` the module on keyword inputs: non-strict first, then strict (see module doc)."""
    errors = []
    for strict in (False, True):
        try:
            return torch.export.export(model, (), dict(example_inputs), dynamic_shapes=dynamic_shapes, strict=strict)
        except Exception as exc:  # noqa: BLE001 - report both attempts below
            if dynamic_shapes is not None and is_constraint_violation(exc):
                text = str(exc)  # torch states its suggested range only in the message: read it here, once
                raise DynamicFramesError(
                    f"{type(model).__name__} cannot be exported with a dynamic frame count in the requested range "
                    f"(the model specialises or bounds it; export with fixed frames or another range): {text.strip()[:1500]}",
                    suggested_range(text, FRAMES_DIM)) from exc
            errors.append(f"strict={strict}: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:400]}")
    raise ExportError(
        f"torch.export could not trace {type(model).__name__} with the given inputs"
        + (" and a dynamic frame count" if dynamic_shapes else "") + ":\n  " + "\n  ".join(errors)
    )


def is_constraint_violation(exc: BaseException) -> bool:
    """torch.export refused a dynamic dimension: ``ConstraintViolationError``, or the ``UserError`` of type
    ``CONSTRAINT_VIOLATION`` that torch.export wraps it in (told by type, not by message)."""
    from torch._dynamo.exc import UserError, UserErrorType
    from torch.fx.experimental.symbolic_shapes import ConstraintViolationError

    return isinstance(exc, ConstraintViolationError) or (
        isinstance(exc, UserError) and getattr(exc, "error_type", None) is UserErrorType.CONSTRAINT_VIOLATION)


def suggested_range(message: str, dim_name: str) -> tuple[int | None, int | None] | None:
    """``(min, max)`` from torch.export's "Suggested fixes: name = Dim('name', min=.., max=..)" text."""
    m = re.search(rf"{dim_name} = Dim\('{dim_name}'([^)]*)\)", message)
    if not m:
        return None
    lo, hi = re.search(r"min=(\d+)", m.group(1)), re.search(r"max=(\d+)", m.group(1))
    return (int(lo.group(1)) if lo else None, int(hi.group(1)) if hi else None)


def site_of(node: torch.fx.Node) -> str | None:
    """Module path of the innermost module a node was traced in (``blocks.0.attn1``), or ``None``: the
    compile path's site naming (:func:`vdit_compile.passes.naming.module_path`), so plan names match."""
    return module_path(node)


def sdpa_nodes(ep: torch.export.ExportedProgram) -> dict[str, list[torch.fx.Node]]:
    """SDPA nodes of the exported graph keyed by module path."""
    out: dict[str, list[torch.fx.Node]] = {}
    for n in ep.graph.nodes:
        if n.op == "call_function" and n.target is _SDPA:
            out.setdefault(site_of(n) or "<unknown>", []).append(n)
    return out


def _frames_of(spec: SiteSpec, L, what: str):
    """Frame count of a site from its sequence length (int, or SymInt for a dynamic export)."""
    lay = spec.layout
    text, P = lay.text_prefix + lay.text_suffix, lay.frame_tokens
    if isinstance(L, int):
        video = L - text
        if video < P or video % P:
            raise ExportError(
                f"{what}: sequence length {L} does not fit the planned layout {lay.describe()} "
                f"({text} text tokens + a multiple of {P} video tokens per frame expected): "
                "the input's height/width or text length differ from the plan"
            )
        return video // P
    return (L - text) // P


def _check_sdpa(node: torch.fx.Node, spec: SiteSpec) -> tuple:
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    dropout = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
    causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
    problems = []
    if mask is not None:
        problems.append("it passes an attention mask")
    if dropout:
        problems.append(f"dropout_p={dropout}")
    if causal:
        problems.append("is_causal=True")
    if node.kwargs.get("enable_gqa"):
        problems.append("enable_gqa=True")
    qv, kv, vv = (a.meta["val"] for a in (q, k, v))
    if qv.dim() != 4 or tuple(kv.shape) != tuple(qv.shape) or tuple(vv.shape[:3]) != tuple(qv.shape[:3]):
        problems.append(f"q/k/v shapes {tuple(qv.shape)}, {tuple(kv.shape)}, {tuple(vv.shape)} are not self-attention (B, H, L, D)")
    elif len(spec.masks) not in (1, int(qv.shape[1])):
        problems.append(f"{len(spec.masks)} masks in the plan for {qv.shape[1]} heads")
    if problems:
        raise ExportError(f"site {spec.name}: cannot rewrite its attention for export: " + "; ".join(problems))
    scale = node.kwargs.get("scale")
    if scale is None:
        scale = float(qv.shape[-1]) ** -0.5
    return q, k, v, float(scale)


def rewrite_sites(ep: torch.export.ExportedProgram, specs: Sequence[SiteSpec]) -> dict[str, dict]:
    """Replace each planned site's SDPA node with ``vdit::tile_attention`` in place; returns per-site facts.

    Raises :class:`ExportError` when a planned site has no (or several) SDPA nodes in the graph, or
    its node cannot be served exactly (mask, dropout, causal, layout mismatch).
    """
    found = sdpa_nodes(ep)
    graph = ep.graph
    facts = {}
    for spec in specs:
        if getattr(spec.layout, "dynamic_text", ""):
            # Mochi / HunyuanVideo 1.5 / Framepack trim text by value: the exported graph would need the
            # per-call text length as a graph value, which this rewrite does not build. Exact, not wrong:
            # the site keeps its dense SDPA.
            why = (f"its text length is only known per call ({spec.layout.dynamic_text} side); export keeps it "
                   f"dense")
            log.warning("export: site %s left dense: %s", spec.name, why)
            facts[spec.name] = {"dense": why}
            continue
        nodes = found.get(spec.name, [])
        if len(nodes) != 1:
            known = ", ".join(sorted(found)) or "none"
            raise ExportError(
                f"site {spec.name}: expected one scaled_dot_product_attention call in the exported graph, found "
                f"{len(nodes)} (module paths with SDPA: {known}); hand-written attention is not supported by export"
            )
        node = nodes[0]
        q, k, v, scale = _check_sdpa(node, spec)
        qv = q.meta["val"]
        L = qv.shape[2]
        L = int(L) if not isinstance(L, torch.SymInt) or L.node.is_constant() else L
        T = _frames_of(spec, L, f"site {spec.name}")
        lay = spec.layout
        with graph.inserting_before(node):
            if isinstance(T, int):
                frames = T
            else:
                size = graph.call_function(torch.ops.aten.sym_size.int, (q, 2))
                size.meta["val"] = L
                video = graph.call_function(operator.sub, (size, lay.text_prefix + lay.text_suffix))
                video.meta["val"] = L - (lay.text_prefix + lay.text_suffix)
                frames = graph.call_function(operator.floordiv, (video, lay.frame_tokens))
                frames.meta["val"] = T
            args = (q, k, v, lay.text_prefix, lay.text_suffix, spec.op_grid(frames), spec.op_masks, scale)
            tile = graph.call_function(torch.ops.vdit.tile_attention.default, args)
            out_val = node.meta["val"]
            lse_dtype = torch.float64 if qv.dtype == torch.float64 else torch.float32
            tile.meta["val"] = (out_val, out_val.new_empty(tuple(out_val.shape[:3]), dtype=lse_dtype))
            out = graph.call_function(operator.getitem, (tile, 0))
            out.meta["val"] = out_val
            for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn"):
                if key in node.meta:
                    tile.meta[key] = out.meta[key] = node.meta[key]
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        facts[spec.name] = {"layout": lay.with_frames(T).to_dict() if isinstance(T, int) else {**lay.to_dict(), "num_frames": "dynamic"},
                            "masks": [m.name for m in spec.masks], "scale": scale,
                            "tile": list(spec.tile) if spec.tile is not None else None}
    graph.lint()
    ep.graph_module.recompile()
    return facts
