"""``to_onnx``: the plan-rewritten transformer as an ONNX file any ONNX runtime can run.

Pipeline: resolve the plan -> ``torch.export`` the transformer -> rewrite planned SDPA sites to
``vdit::tile_attention`` (:mod:`.graph`) -> ``torch.onnx.export(dynamo=True)`` with the op translated
to standard ONNX operators (:mod:`.onnx_attention`) or to a ``vdit.TileAttention`` custom node ->
metadata (plan, fingerprint, input contract) -> save (external data above 2 GB).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.utils import _pytree as pytree

from .. import __version__
from .._optional import require
from ..plans import Plan, model_class_name, model_fingerprint, unwrap_model
from .adapters import export_adapters
from .errors import DynamicFramesError, ExportError, MissingDependencyError
from .graph import SiteSpec, export_program, rewrite_sites
from .plan_sites import resolve_plan, site_specs

log = logging.getLogger(__name__)

#: ONNX protobuf files cannot exceed 2 GiB: weights beyond this go to external data.
PROTOBUF_LIMIT = 2 * 1024**3
META_PREFIX = "vdit_compile."


@dataclass
class ExportResult:
    """What :func:`to_onnx` wrote and the facts the runner and ``--check`` need."""

    path: Path
    inputs: list[dict]
    outputs: list[str]
    sites: dict[str, dict]
    plan: Plan
    fingerprint: str
    program: torch.export.ExportedProgram = field(repr=False)
    external_data: bool = False

    def torch_module(self) -> torch.nn.Module:
        """The rewritten exported program as a runnable module (same graph the ONNX file came from)."""
        return self.program.module()


def _require_onnx():
    for name in ("onnx", "onnxscript"):
        require(name, why="ONNX export", error=MissingDependencyError)


def check_output_path(path, overwrite: bool) -> Path:
    """Refuse, before any tracing, an output that exists (without ``overwrite``), is a directory, lies under
    a file or in a directory that cannot be written.  An empty file (what an interrupted export of an older
    version left) is replaced with a warning: it holds nothing to lose."""
    from ..validation import check_output_file

    path = Path(path)
    try:
        check_output_file(path, "output")
    except (TypeError, ValueError) as exc:
        raise ExportError(str(exc)) from None
    if path.is_file() and path.stat().st_size == 0 and not overwrite:
        log.warning("output %s is an empty file (an interrupted earlier export?); replacing it", path)
    elif path.exists() and not overwrite:
        raise ExportError(f"output {path} already exists; pass --overwrite (overwrite=True) to replace it")
    return path


def save_atomically(prog, path: Path, external_data: bool) -> None:
    """``prog.save`` without ever leaving a torn file at ``path``.

    The program is saved under its final base name in a temporary directory beside ``path`` (so the
    external-data reference, ``<name>.data``, stays right), fsynced, and each file is renamed into
    place; the ``.onnx`` last, so a kill leaves the previous model or the new one.
    """
    import shutil
    import tempfile

    from ..atomic import fsync_dir, fsync_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        prog.save(str(tmp_dir / path.name), external_data=external_data)
        files = sorted(tmp_dir.iterdir(), key=lambda f: f.name == path.name)  # the .onnx last
        for f in files:
            fsync_file(f)
        for f in files:
            f.chmod(0o644)
            f.replace(path.parent / f.name)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def output_names(model: torch.nn.Module, example_inputs: Mapping) -> list[str]:
    """Output names as the diffusers forward names them (``sample`` for ``Transformer2DModelOutput``)."""
    with torch.no_grad():
        out = model(**example_inputs)
    if hasattr(out, "keys"):  # ModelOutput / dict: its field names, nested fields suffixed by position
        names = []
        for key in out.keys():
            n = len(pytree.tree_leaves(out[key]))
            names += [key] if n == 1 else [f"{key}_{i}" for i in range(n)]
        return names
    n = len(pytree.tree_leaves(out))
    return ["sample"] if n == 1 else [f"output_{i}" for i in range(n)]  # diffusers' (sample,) with return_dict=False


def _frames_dynamic_shapes(model, example_inputs: Mapping, frames_dim: int | None, min_frames: int, max_frames: int | None):
    """``dynamic_shapes`` making the frame axis of ``hidden_states`` dynamic (others static)."""
    from .graph import FRAMES_DIM
    from .shapes import frames_axis, temporal_patch

    if "hidden_states" not in example_inputs:
        raise ExportError("dynamic frames need a 'hidden_states' input; found " + ", ".join(example_inputs))
    hs = example_inputs["hidden_states"]
    axis = frames_axis(model, hs) if frames_dim is None else frames_dim
    r = temporal_patch(model)
    latent = torch.export.Dim(FRAMES_DIM, min=min_frames, max=max_frames)
    dim = latent * r if r > 1 else latent
    if hs.shape[axis] % r:
        raise ExportError(f"hidden_states has {hs.shape[axis]} frames on axis {axis}, not a multiple of the temporal patch {r}")
    shapes = {k: pytree.tree_map(lambda _: None, v) if not isinstance(v, torch.Tensor) else None for k, v in example_inputs.items()}
    shapes["hidden_states"] = {axis: dim}
    return shapes, axis, r


def _export_dynamic(module, example_inputs, specs, frames_dim, min_frames, max_frames):
    """Export with a dynamic frame axis; when the model bounds the frame count (e.g. a RoPE table) and
    no explicit ``max_frames`` was asked, retry once with the range torch.export suggests."""
    lo = min_frames if min_frames is not None else max([s.max_global for s in specs] + [0]) + 1
    lo, hi = max(lo, 2), max_frames
    for attempt in range(2):
        shapes, axis, r = _frames_dynamic_shapes(module, example_inputs, frames_dim, lo, hi)
        try:
            return export_program(module, example_inputs, shapes), axis, r
        except DynamicFramesError as exc:
            fix = exc.suggested
            if attempt or max_frames is not None or fix is None or (fix[0] or lo) > (fix[1] or 10**9):
                raise
            lo, hi = max(lo, fix[0] or lo), fix[1]
            log.warning("%s bounds the frame count: exporting with %s..%s latent frames", type(module).__name__, lo, hi)
    raise AssertionError("unreachable")


def _input_contract(ep: torch.export.ExportedProgram, onnx_inputs: list[str]) -> list[dict]:
    """Per ONNX input: name, dtype, shape (ints, or ``{"symbol", "min", "max", "multiple"}`` for dynamic dims)."""
    user = [s for s in ep.graph_signature.input_specs if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    specs = []
    for spec, name in zip(user, onnx_inputs):
        val = nodes[spec.arg.name].meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        shape = []
        for d in val.shape:
            if isinstance(d, int) or (isinstance(d, torch.SymInt) and d.node.is_constant()):
                shape.append(int(d))
                continue
            expr = d.node.expr
            free = sorted(expr.free_symbols, key=str)
            vr = ep.range_constraints.get(free[0]) if free else None
            coeff = int(expr.coeff(free[0])) if free and expr.is_Mul else 1
            shape.append({"symbol": str(expr), "min": int(vr.lower) * coeff if vr else None,
                          "max": int(vr.upper) * coeff if vr and vr.upper.is_finite else None, "multiple": coeff})
        specs.append({"name": name, "dtype": str(val.dtype).replace("torch.", ""), "shape": shape})
    return specs


def to_onnx(
    model,
    example_inputs: Mapping[str, Any],
    path,
    plan=None,
    *,
    dynamic_frames: bool = False,
    frames_dim: int | None = None,
    min_frames: int | None = None,
    max_frames: int | None = None,
    attention: str = "standard",
    external_data: bool | None = None,
    overwrite: bool = False,
    opset: int = 18,
) -> ExportResult:
    """Export the transformer of ``model`` rewritten with ``plan`` to ONNX at ``path``.

    Args:
        model: an ``nn.Module`` or a pipeline with ``.transformer`` (optimised or not: the original
            module is re-traced; its plan is taken from ``plan``, else from the optimised model).
        example_inputs: the transformer's forward kwargs (e.g. ``hidden_states``, ``timestep``, ...);
            fixes every static dimension of the exported graph.
        plan: a :class:`~vdit_compile.plans.Plan`, a plan JSON path, a :class:`~vdit_compile.masks.MaskSpec`
            or mask name of any family (``"g1w0"``, ``"win3d-t1h1w1"``: uniform on every tileable site).
        dynamic_frames: make the frame axis of ``hidden_states`` dynamic (``min_frames`` .. ``max_frames``
            latent frames; default minimum: the largest global-frame count + 1).  Models that specialise
            the frame count refuse with an :class:`ExportError` saying so.
        attention: ``"standard"`` (exact standard-ONNX translation; any runtime) or ``"custom"`` (one
            ``vdit.TileAttention`` node per site, for runtimes with a fused kernel; see docs/export.md).
        external_data: store weights in ``<path>.data``; default: only when they exceed 2 GB.
    """
    _require_onnx()
    from .onnx_attention import tile_attention_custom_node, tile_attention_onnx

    if attention not in ("standard", "custom"):
        raise ExportError(f"attention must be 'standard' or 'custom', found {attention!r}")
    path = check_output_path(path, overwrite)
    module = unwrap_model(model)
    plan = resolve_plan(model, example_inputs, plan)
    specs: list[SiteSpec] = site_specs(plan)
    axis, r = None, 1
    names_out = output_names(module, example_inputs)
    table = {torch.ops.vdit.tile_attention.default: tile_attention_onnx if attention == "standard" else tile_attention_custom_node}
    with export_adapters(module, example_inputs):
        if dynamic_frames:
            ep, axis, r = _export_dynamic(module, example_inputs, specs, frames_dim, min_frames, max_frames)
        else:
            ep = export_program(module, example_inputs)
        facts = rewrite_sites(ep, specs)
        prog = torch.onnx.export(ep, (), kwargs=dict(example_inputs), dynamo=True, custom_translation_table=table,
                                 opset_version=opset, optimize=True, verbose=False)
    graph = prog.model.graph
    if len(graph.outputs) == len(names_out):
        for value, name in zip(graph.outputs, names_out):
            value.name = name
    inputs = _input_contract(ep, [v.name for v in graph.inputs])
    fingerprint = model_fingerprint(module)
    meta = {
        "version": __version__,
        "model_class": model_class_name(module),
        "fingerprint": fingerprint,
        "plan": json.dumps(plan.to_dict()),
        "sites": json.dumps(facts),
        "inputs": json.dumps(inputs),
        "outputs": json.dumps(names_out),
        "attention": attention,
        "dynamic_frames": json.dumps({"axis": axis, "temporal_patch": r} if dynamic_frames else None),
    }
    prog.model.metadata_props.update({META_PREFIX + k: v for k, v in meta.items()})
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers())
    ext = external_data if external_data is not None else weight_bytes > PROTOBUF_LIMIT
    save_atomically(prog, path, ext)
    log.info("wrote %s (%d tiled sites, external data: %s)", path, len(facts), ext)
    return ExportResult(path, inputs, names_out, facts, plan, fingerprint, ep, ext)


def read_metadata(path) -> dict:
    """The ``vdit_compile.*`` metadata of an exported file (JSON values decoded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    out = {}
    for prop in model.metadata_props:
        if prop.key.startswith(META_PREFIX):
            key = prop.key[len(META_PREFIX):]
            try:
                out[key] = json.loads(prop.value) if key not in ("version", "model_class", "fingerprint", "attention") else prop.value
            except json.JSONDecodeError:
                out[key] = prop.value
    return out
