"""Per-model runtime state shared by the capture backend, the passes and the rewritten graphs.

Rewritten graphs call back into Python (calibration observers, shared-graph dispatch) with
the integer id of an :class:`OptimizeState` and of a :class:`SiteTemplate`; this module finds
those objects by id through weak references (the optimised model holds its state; nothing here keeps a
model alive).  Nothing here patches torch or diffusers globally: a state is
registered by :func:`vdit_compile.optimize` and dropped by :func:`vdit_compile.restore`.
"""
from __future__ import annotations

import itertools
import warnings
import weakref

import torch

from ..masks.base import MaskSpec
from ..passes.naming import RootNames, rebase

#: id -> state, weakly: the model owns its state (``module.__dict__``), so deleting the model frees both
_STATES: "weakref.WeakValueDictionary[int, OptimizeState]" = weakref.WeakValueDictionary()
_IDS = itertools.count(1)


class OptimizeState:
    """Mode (``inspect`` | ``calibrate`` | ``apply``), plan, calibrators and discovered sites of one model."""

    def __init__(self, root: torch.nn.Module, config, parallel=None):
        self.id = next(_IDS)
        self.root, self.config, self.parallel = root, config, parallel
        self.mode = "inspect"
        self.plan = None
        self.uniform_mask: MaskSpec | None = None
        self.step_range: int | None = None  # step range of the running call (step-aware plans); see capture/install.py
        self.sites: dict[str, object] = {}  # name -> AttentionSite, in discovery order
        self.calibrators: dict[str, object] = {}
        self.templates: list = []
        self.call: tuple[tuple, dict] = ((), {})
        self.graphs = 0
        self.rewritten: set[str] = set()  # sites running through vdit::tile_attention
        self.pending_error: BaseException | None = None
        self._root_names: RootNames | None = None
        self._warned: set[str] = set()
        self.cost_decisions: dict[str, tuple[bool, str]] = {}  # site -> (rewrite?, reason) of the cost model
        _STATES[self.id] = self

    # ------------------------------------------------------------------ registry
    @staticmethod
    def get(state_id: int) -> "OptimizeState":
        try:
            return _STATES[state_id]
        except KeyError:
            raise RuntimeError(f"vdit-compile state {state_id} is gone: the model was restored; optimize it again") from None

    def close(self) -> None:
        _STATES.pop(self.id, None)

    def __deepcopy__(self, memo):  # copy.deepcopy(optimised model): a fresh state for the copy
        from ..capture.copying import copy_state

        return copy_state(self, memo)

    @property
    def root_names(self) -> RootNames:
        if self._root_names is None:
            self._root_names = RootNames(self.root)
        return self._root_names

    def add_template(self, template) -> int:
        self.templates.append(template)
        return len(self.templates) - 1

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    # ------------------------------------------------------------------ sites
    def record_site(self, site) -> None:
        if site.name not in self.sites:
            self.sites[site.name] = site

    def site_list(self) -> list:
        return list(self.sites.values())

    def resolve(self, template, anchor: torch.Tensor | None):
        """The concrete site a template stands for on this call (shared graphs: by the anchor parameter)."""
        if not template.shared:
            return template.site
        pair = self.root_names.alias(anchor, template.anchor_local) if anchor is not None else None
        name = rebase(template.local_path, pair[0], pair[1]) if pair is not None else None
        if name is None:
            raise RuntimeError(f"vdit-compile: cannot tell which module ran the shared attention graph {template.local_path}")
        from dataclasses import replace

        return replace(template.site, name=name)

    # ------------------------------------------------------------------ masks
    def site_filter_allows(self, name: str) -> bool:
        filt = getattr(self.config, "site_allowed", None)
        return filt(name) if callable(filt) else True

    def tile_for(self, site) -> tuple[int, int] | None:
        """The token tile the site's masks are stated in (``None``: whole frames)."""
        if self.uniform_mask is not None:
            if not self.uniform_mask.needs_tiles:
                return None
            from ..plans import default_tile

            return default_tile(site.layout, getattr(self.config, "tile_tokens", None))
        sp = self.plan.site(site.name) if self.plan is not None else None
        return sp.tile if sp is not None else None

    def masks_for(self, site) -> list[MaskSpec] | None:
        """Per-head masks to apply at ``site`` now (for step-aware plans: the running call's step range),
        or ``None`` to leave it dense."""
        if not site.tileable or not self.site_filter_allows(site.name):
            return None
        if self.uniform_mask is not None:
            return self._if_it_pays(site, [self.uniform_mask] * site.num_heads)
        if self.plan is None:
            return None
        from ..plans import PlanMismatchError

        sp = self.plan.site(site.name)
        if sp is None:
            raise PlanMismatchError([f"tileable site {site.name} ({site.layout.describe()}) is not in the plan"])
        if not sp.tiled:
            return None
        masks = sp.masks_for(site.layout, self.step_range)
        if len(masks) != site.num_heads:
            raise PlanMismatchError([f"site {site.name}: {len(masks)} head masks in the plan, {site.num_heads} heads now"])
        return self._if_it_pays(site, masks)

    def _if_it_pays(self, site, masks: list[MaskSpec]) -> list[MaskSpec] | None:
        """``masks``, or ``None`` where the cost model keeps the site dense (decided once per site, reason kept
        in :attr:`cost_decisions`); see :mod:`vdit_compile.runtime.cost_model`."""
        key = site.name if self.step_range is None else f"{site.name}@range{self.step_range}"
        decision = self.cost_decisions.get(key)
        if decision is None:
            from ..masks.base import masks_density
            from ..masks.units import UnitGrid
            from .cost_model import should_rewrite

            param = next(self.root.parameters(), None)
            device, dtype = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
            lay = site.layout
            tile = self.tile_for(site) or (lay.height, lay.width)
            grid = UnitGrid(lay.num_frames, lay.height, lay.width, *tile, frame_minor=lay.order == "HWT")
            density = 1.0 if lay.is_dynamic else masks_density(masks, lay, grid)
            decision = self.cost_decisions[key] = should_rewrite(device, dtype, lay, density, site.num_heads,
                                                                       site.head_dim, self.config, tile=tile,
                                                                       masks=masks)
        return masks if decision[0] else None
