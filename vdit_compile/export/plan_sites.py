"""Which plan an export uses and what it says per site (the only place export reads the core's plan/sites).

A plan may be given as a :class:`~vdit_compile.plans.Plan`, a plan JSON path, a
:class:`~vdit_compile.masks.MaskSpec` of any family or a mask name (``"g1w0"``, ``"win3d-t1h1w1"``:
the same mask on every tileable site, found by the core's ``inspect_model``; window families get the
plan's default token tile), or be carried by a model that ``vdit_compile.optimize``
rewrote.  Without any of these export refuses: exporting a dense model through this tool is not
what anyone means, and the plan is what the file's metadata records.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

from ..masks.base import MaskSpec, parse_mask
from ..plans import Plan, unwrap_model
from .errors import ExportError
from .graph import SiteSpec

log = logging.getLogger(__name__)


def _mask_name(plan) -> MaskSpec | None:
    """The spec a plan argument names (``"g1w0"``, ``"win3d-t1h1w1"``...), or ``None`` for a path."""
    if not isinstance(plan, str) or Path(plan).exists():
        return None
    try:
        return parse_mask(plan)
    except ValueError:
        return None


def _inspect(model, example_inputs: Mapping):
    from .. import inspect_model

    return inspect_model(model, dict(example_inputs))


def attached_plan(model) -> Plan | None:
    """The plan a model rewritten by ``vdit_compile.optimize`` carries, if any."""
    from .. import plan_of

    try:
        plan = plan_of(model)
    except TypeError:  # neither a module nor a pipeline with .transformer
        plan = None
    if isinstance(plan, Plan):
        return plan
    for obj in (model, getattr(model, "transformer", None), unwrap_model(model) if model is not None else None):
        for attr in ("vdit_plan", "_vdit_plan"):
            plan = getattr(obj, attr, None)
            if isinstance(plan, Plan):
                return plan
        state = getattr(obj, "_vdit_state", None) or getattr(obj, "_vdit_compile", None)
        plan = getattr(state, "plan", None)
        if isinstance(plan, Plan):
            return plan
    return None


def resolve_plan(model, example_inputs: Mapping, plan) -> Plan:
    """A checked :class:`Plan` for ``model`` at ``example_inputs`` (see module doc); raises ExportError."""
    module = unwrap_model(model)
    if plan is None:
        plan = attached_plan(model)
        if plan is None:
            raise ExportError(
                "no plan: export needs the plan that says which attention sites are tiled. Pass --plan plan.json "
                "(from `vdit-compile calibrate`), a uniform mask such as --plan g1w0, or a model returned by "
                "vdit_compile.optimize(..., plan=...)"
            )
    spec = _mask_name(plan)
    if spec is not None:
        plan = spec
    if isinstance(plan, (str, Path)):
        if not Path(plan).is_file():
            raise ExportError(f"plan file {plan} not found (expected a JSON plan from `vdit-compile calibrate` or a mask name like g1w0 or win3d-t1h1w1)")
        plan = Plan.load(plan)
    sites = None
    if isinstance(plan, MaskSpec):
        sites = _inspect(model, example_inputs)
        plan = Plan.uniform(sites, plan, module)
    if not isinstance(plan, Plan):
        raise ExportError(f"plan must be a Plan, a JSON path, a MaskSpec or a mask name, found {type(plan).__name__}")
    if sites is None:
        sites = _inspect(model, example_inputs)
    plan.check_compatible(module, sites)
    if not plan.tiled_sites():
        raise ExportError("the plan tiles no attention site: nothing for vdit-compile to export beyond the dense model")
    return plan


def site_specs(plan: Plan) -> list[SiteSpec]:
    """One :class:`SiteSpec` per tiled site; a step-aware site exports its top-level masks (one graph for every
    step), with a warning."""
    out = []
    for s in plan.tiled_sites():
        if s.step_ranges:
            log.warning("export: site %s has masks per denoising-step range; the exported graph uses its top-level "
                        "masks (%s) at every step", s.name, ",".join(m.name for m in s.masks))
        out.append(SiteSpec(s.name, s.layout, tuple(s.masks), tuple(s.tile) if s.tile is not None else None))
    return out
