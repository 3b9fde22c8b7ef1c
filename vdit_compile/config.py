"""``OptimizeConfig``: every knob of :func:`vdit_compile.optimize` in one dataclass."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, fields
from typing import Callable, Sequence

from .kernels.options import KernelOptions
from .masks.base import MaskSpec, parse_mask
from .plans.plan import DEFAULT_ERROR_BUDGET


@dataclass
class OptimizeConfig:
    """Settings of one ``optimize`` call.

    Attributes:
        error_budget: per-head relative L2 error of the attention output allowed by a mask
            (see ``vdit_compile.plans.DEFAULT_ERROR_BUDGET`` for the default and why).
        max_density: optional upper bound on the chosen masks' density (sparser if possible).
        candidates: mask names to search (``["g1w0", "g2w1", ...]``); ``None`` = default family.
        calib_steps: denoising steps per calibration prompt when calibrating a pipeline.
        calib_every / calib_max_calls: subsample the recorded transformer calls.
        calib_seed: calibration prompt ``i`` runs with generator seed ``calib_seed + i`` (the output check's
            runs too, so they see the same noise).
        calib_kwargs: extra pipeline arguments for calibration runs (``num_frames``, ``height``...).
        backend: ``"auto"`` (inductor on CUDA, eager on CPU), ``"inductor"`` or ``"eager"``.
        sites: site filter: glob patterns of site names to tile (``["blocks.*.attn1"]``) or a
            callable ``name -> bool``; other sites stay dense.
        progress: show progress bars.
        tile_tokens: tokens per token tile for window families (default: the kernels' block of 128, or a
            quarter frame on small frames; always a divisor tile of the frame).
        families: mask families calibration searches (``vdit_compile.masks.known_families()``).
        step_ranges: number of denoising-step ranges a plan may give different masks (1 = one plan for
            every step; more = step-aware plans, one compilation per range).
        selection: how a site's heads share the error budget: ``"head"`` (each head its sparsest mask within
            the budget) or ``"tile-capped"`` (also: no site errs more than frame tiles alone would);
            :mod:`vdit_compile.calibration.allocation`.
        kernel: options of the CUDA kernels for this model (forward path, tile overrides;
            ``vdit_compile.kernels.options.KernelOptions``); ``None`` = the defaults.
        cost_model: ``"auto"`` (default: on CPU a site is rewritten only where the tile op is timed
            faster than dense SDPA at its shape and density), ``"measure"`` (time on every device),
            ``"always"`` (rewrite every tiled site); see :mod:`vdit_compile.runtime.cost_model`.
        fp8: FP8 linears (torchao float8 dynamic activation + weight, fused under torch.compile):
            ``False``/``"off"``, ``True``/``"on"`` (error where the device or install cannot),
            ``"auto"`` (warning and high precision there) or ``"emulate"`` (FP8 numerics in fp32 on
            any device: quality studies only).  See :mod:`vdit_compile.wholestep.fp8`.
        fp8_keep: extra glob patterns of linear names kept in high precision.
        fp8_max_error: linears whose emulated FP8 relative error exceeds this stay high precision.
        fuse_qkv: fuse each attention's q/k/v projections into one linear (diffusers'
            ``fuse_qkv_projections``) before FP8 and the compile: one GEMM and, with FP8, one activation
            quantisation instead of three; :mod:`vdit_compile.wholestep.fusion`. Off by default until timed.
        cache: step-caching policy, ``None`` or ``"taylorseer"`` / ``"fbc"``
            (:mod:`vdit_compile.wholestep.caching`).
        cache_threshold: the policy's knob (taylorseer: interval, default 2; fbc: residual change, 0.05).
        cache_warmup / cache_order: steps always evaluated first; Taylor order (taylorseer).
        calib_checkpoint: file where calibration statistics are saved after every transformer call (atomic);
            a calibration interrupted (even by kill -9) resumes from it when run again with the same path.
        output_psnr: after calibration, run the calibration prompts (a bare transformer: its calibration
            calls) again under the plan and require this PSNR in dB against the dense samples, giving the
            worst heads back to dense attention until it holds (``None``: no check; per-head budgets only).
            The samples compared are what calibration runs: latents where the pipeline takes
            ``output_type="latent"`` (diffusers pipelines; peak = the dense latents' range), else its frames.
            Why and how: :mod:`vdit_compile.calibration.output_check`.
        output_check_trials: at most this many runs of the calibration samples for the check (bisection).
    """

    error_budget: float = DEFAULT_ERROR_BUDGET
    max_density: float | None = None
    candidates: Sequence[str] | None = None
    calib_steps: int = 4
    calib_every: int = 1
    calib_max_calls: int | None = None
    calib_kwargs: dict = field(default_factory=dict)
    calib_seed: int = 0
    backend: str = "auto"
    sites: Sequence[str] | Callable[[str], bool] | None = None
    progress: bool = True
    tile_tokens: int | None = None
    families: Sequence[str] = ("tile", "win3d", "spatial")
    step_ranges: int = 1
    selection: str = "head"
    kernel: KernelOptions | None = None
    cost_model: str = "auto"
    fp8: bool | str = False
    fp8_keep: Sequence[str] | None = None
    fp8_max_error: float = 0.05
    fuse_qkv: bool = False
    cache: str | None = None
    cache_threshold: float | None = None
    cache_warmup: int = 3
    cache_order: int = 1
    calib_checkpoint: str | None = None
    output_psnr: float | None = None
    output_check_trials: int = 8

    def __post_init__(self):
        from .validation import check_candidates, check_error_budget, check_number, check_site_patterns

        if self.backend not in ("auto", "inductor", "eager"):
            raise ValueError(f"backend must be 'auto', 'inductor' or 'eager', found {self.backend!r}")
        check_error_budget(self.error_budget)
        check_number("max_density", self.max_density, minimum=0, min_open=True, maximum=1, allow_none=True)
        check_number("calib_steps", self.calib_steps, minimum=1, integer=True)
        check_number("calib_every", self.calib_every, minimum=1, integer=True)
        check_number("calib_seed", self.calib_seed, minimum=0, integer=True)
        check_number("calib_max_calls", self.calib_max_calls, minimum=1, integer=True, allow_none=True)
        if not isinstance(self.calib_kwargs, dict):
            raise TypeError(f"calib_kwargs must be a dict of pipeline arguments, found {type(self.calib_kwargs).__name__}")
        check_site_patterns(self.sites)
        if self.cost_model not in ("auto", "measure", "always"):
            raise ValueError(f"cost_model must be 'auto', 'measure' or 'always', found {self.cost_model!r}")
        if self.candidates is not None:
            check_candidates(self.candidates)
            self.candidate_masks()  # validates the names
        from .masks.base import known_families
        from .wholestep.caching import check_policy
        from .wholestep.fp8 import normalize_mode

        normalize_mode(self.fp8)
        if not self.fp8_max_error > 0:
            raise ValueError(f"fp8_max_error must be > 0, found {self.fp8_max_error}")
        if isinstance(self.fp8_keep, str):
            raise TypeError(f"fp8_keep must be a list of glob patterns, found the string {self.fp8_keep!r}")
        check_policy(self.cache, self.cache_threshold, self.cache_warmup, self.cache_order)

        unknown = [f for f in self.families if f not in known_families()]
        if unknown:
            raise ValueError(f"unknown mask families {unknown}: known are {sorted(known_families())}")
        if isinstance(self.step_ranges, bool) or not isinstance(self.step_ranges, int) or self.step_ranges < 1:
            raise ValueError(f"step_ranges must be an int >= 1, found {self.step_ranges!r}")
        from .calibration.allocation import check_selection

        check_selection(self.selection)
        check_number("output_psnr", self.output_psnr, minimum=0, min_open=True, allow_none=True)
        check_number("output_check_trials", self.output_check_trials, minimum=1, integer=True)
        if self.tile_tokens is not None and (not isinstance(self.tile_tokens, int) or self.tile_tokens < 1):
            raise ValueError(f"tile_tokens must be an int >= 1 or None, found {self.tile_tokens!r}")

    def candidate_masks(self) -> list[MaskSpec] | None:
        return None if self.candidates is None else [parse_mask(c) for c in self.candidates]

    def site_allowed(self, name: str) -> bool:
        if self.sites is None:
            return True
        if callable(self.sites):
            return bool(self.sites(name))
        return any(fnmatch.fnmatchcase(name, pat) for pat in self.sites)

    @classmethod
    def build(cls, config: "OptimizeConfig | None" = None, **overrides) -> "OptimizeConfig":
        """``config`` (or the defaults) with keyword overrides; unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown optimize option(s) {unknown}; valid options: {sorted(names)}")
        base = {f.name: getattr(config, f.name) for f in fields(cls)} if config is not None else {}
        base.update(overrides)
        return cls(**base)
