"""Training-free step caching: skip some transformer evaluations of a sampling trajectory.

Why at the transformer call: ``optimize`` routes the transformer's forward through ``torch.compile``;
a cache decision is data-dependent Python control flow, which inside the compiled region costs graph
breaks and guard-driven recompiles.  So the policy here sits *outside* the compiled forward: a thin
wrapper decides per call whether to run the (compiled, tile-rewritten) transformer or to predict its
output from earlier ones.  Nothing is recompiled and every skipped call is a whole transformer
evaluation saved, which is what the report counts.

Policies (``OptimizeConfig.cache``):

* ``"taylorseer"`` (default policy): TaylorSeer (Liu et al. 2025, "From Reusing to Forecasting")
  applied to the transformer's output: the first ``warmup`` steps run, then one step in
  ``interval`` runs and the steps between are forecast with the finite-difference expansion (order
  ``cache_order``; 0 = reuse) of the output in the step index, through the last evaluated steps.
  ``cache_threshold`` is the interval (an integer >= 2; default 2).
* ``"fbc"``: diffusers' own First Block Cache hooks (``diffusers.hooks.apply_first_block_cache``):
  the first block always runs; when its residual changed by less than ``cache_threshold``
  (relative mean absolute difference; default 0.05) the other blocks are skipped and their cached
  residual is added.  The hooks sit on the blocks, inside the compiled forward: their decision is
  ``torch.compiler.disable``-d (a graph break), so the compiled graph is split there (two variants
  of the remaining blocks, computed / skipped).  A call whose remaining blocks were skipped counts
  as a skipped evaluation (it still ran one block).

Trajectories are told apart by the timestep: it decreases along one sample, so a call whose
timestep is not below the previous one starts a new sample (the cache is cleared); calls that
repeat a step's timestep (pipelines that evaluate cond and uncond separately) each get their own
stream of history.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

POLICIES = ("taylorseer", "fbc")
DEFAULT_POLICY = "taylorseer"
DEFAULTS = {"taylorseer": 2.0, "fbc": 0.05}
_FBC_LEADER = "fbc_leader_block_hook"


def check_policy(policy, threshold, warmup: int, order: int) -> None:
    """Validate the cache options (called from ``OptimizeConfig.__post_init__``)."""
    if policy is None:
        return
    if policy not in POLICIES:
        raise ValueError(f"cache must be None or one of {POLICIES}, found {policy!r}")
    if threshold is not None:
        if policy == "taylorseer" and not (float(threshold) == int(threshold) and threshold >= 2):
            raise ValueError(f"cache='taylorseer': cache_threshold is the interval, an integer >= 2; found {threshold!r}")
        if policy == "fbc" and not threshold > 0:
            raise ValueError(f"cache='fbc': cache_threshold must be > 0, found {threshold!r}")
    if warmup < 1:
        raise ValueError(f"cache_warmup must be >= 1 (the first step always runs), found {warmup}")
    if order not in (0, 1, 2):
        raise ValueError(f"cache_order must be 0, 1 or 2, found {order}")


def _sample_of(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "sample"):
        return out.sample
    raise TypeError(f"step cache: cannot find the output tensor in a {type(out).__name__}")


def _with_sample(out, sample: torch.Tensor):
    if isinstance(out, torch.Tensor):
        return sample
    if isinstance(out, (tuple, list)):
        return type(out)([sample, *out[1:]])
    return type(out)(sample=sample)


def _timestep(args, kwargs) -> float | None:
    t = kwargs.get("timestep")
    if t is None and len(args) >= 2 and isinstance(args[1], torch.Tensor):
        t = args[1]
    if isinstance(t, torch.Tensor):
        return float(t.detach().flatten()[0].float().cpu()) if t.numel() else None
    return float(t) if isinstance(t, (int, float)) else None


@dataclass
class _Stream:
    """History of one stream (one call per step) of one sample."""

    factors: list = field(default_factory=list)  # the last order + 1 evaluated (step, output) pairs
    last_eval_step: int = -1
    template: object = None  # the last real output (structure to fill)


@dataclass
class CacheStats:
    """Transformer calls and evaluations of the current and past samples."""

    samples: list = field(default_factory=list)  # one {"calls", "evaluations"} per finished or running sample

    def start(self) -> None:
        self.samples.append({"calls": 0, "evaluations": 0})

    def as_dict(self) -> dict:
        calls = sum(s["calls"] for s in self.samples)
        evals = sum(s["evaluations"] for s in self.samples)
        return {"samples": [dict(s) for s in self.samples], "calls": calls, "evaluations": evals,
                "evaluated_fraction": evals / calls if calls else None}


class StepCache:
    """The per-model cache: wraps the module's current forward (see the module doc)."""

    def __init__(self, module: torch.nn.Module, policy: str, threshold: float | None = None, warmup: int = 3,
                 order: int = 1):
        check_policy(policy, threshold, warmup, order)
        self.module, self.policy = module, policy
        self.threshold = float(DEFAULTS[policy] if threshold is None else threshold)
        self.warmup, self.order = int(warmup), int(order)
        self.stats = CacheStats()
        self._step_t: float | None = None
        self._step = -1
        self._slot = 0
        self._streams: dict[int, _Stream] = {}
        self._inner = None
        self._fbc = None

    # ------------------------------------------------------------------ install / undo
    def attach(self) -> None:
        """Wrap ``module.forward`` (the compiled one after ``optimize``); FBC also hooks the blocks."""
        if self.policy == "fbc":
            from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

            apply_first_block_cache(self.module, FirstBlockCacheConfig(threshold=self.threshold))
            self._fbc = self._leader_hook()
        self._inner = self.module.forward
        inner = self._inner

        @functools.wraps(inner)
        def forward(*args, **kwargs):
            return self(inner, args, kwargs)

        self.module.__dict__["forward"] = forward

    def detach(self) -> None:
        """Remove the FBC hooks (the forward wrapper goes with ``uninstall``'s forward swap)."""
        if self._fbc is not None:
            from diffusers.hooks import HookRegistry
            from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK

            registry = HookRegistry.check_if_exists_or_initialize(self.module)
            registry.remove_hook(_FBC_LEADER, recurse=True)
            registry.remove_hook(_FBC_BLOCK_HOOK, recurse=True)
            self._fbc = None

    def _leader_hook(self):
        for m in self.module.modules():
            reg = getattr(m, "_diffusers_hook", None)
            if reg is not None and reg.get_hook(_FBC_LEADER) is not None:
                return reg.get_hook(_FBC_LEADER)
        raise RuntimeError("cache='fbc': diffusers did not install its first-block hook (no transformer blocks found)")

    # ------------------------------------------------------------------ per call
    def reset(self) -> None:
        """Forget the cached outputs (a new sample starts)."""
        self._streams.clear()
        self._step_t, self._step, self._slot = None, -1, 0
        if self._fbc is not None:
            self._fbc.state_manager.reset()

    def _locate(self, t: float | None) -> None:
        if t is None:  # no timestep: every call is its own step of one stream
            if self._step < 0:
                self.stats.start()
            self._step += 1
            return
        if self._step_t is not None and t == self._step_t:
            self._slot += 1
            return
        if self._step_t is None or t > self._step_t:
            self.reset()
            self.stats.start()
        self._step_t, self._step, self._slot = t, self._step + 1, 0

    def __call__(self, inner, args, kwargs):
        self._locate(_timestep(args, kwargs))
        stream = self._streams.setdefault(self._slot, _Stream())
        sample = self.stats.samples[-1]
        sample["calls"] += 1
        if self.policy == "fbc":
            return self._call_fbc(inner, args, kwargs, sample)
        step = self._step
        if step < self.warmup or not stream.factors or (step - self.warmup) % int(self.threshold) == 0:
            out = inner(*args, **kwargs)
            self._update(stream, _sample_of(out), step)
            stream.template = out
            sample["evaluations"] += 1
            return out
        return _with_sample(stream.template, self._forecast(stream, step))

    def _call_fbc(self, inner, args, kwargs, sample):
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        _set_cache_context(self.module, CacheContext(f"vdit-stream-{self._slot}"))
        try:
            out = inner(*args, **kwargs)
            state = self._fbc.state_manager.get_state()
            sample["evaluations"] += int(bool(state.should_compute))
        finally:
            _set_cache_context(self.module, None)
        return out

    # ------------------------------------------------------------------ TaylorSeer
    def _update(self, stream: _Stream, y: torch.Tensor, step: int) -> None:
        stream.factors = (stream.factors + [(step, y.detach())])[-(self.order + 1):]
        stream.last_eval_step = step

    def _forecast(self, stream: _Stream, step: int) -> torch.Tensor:
        """The polynomial through the last ``order + 1`` evaluated (step, output) points, at ``step``.

        TaylorSeer's finite-difference Taylor series, written in Newton/Lagrange form so that it stays
        exact for polynomials of its order when the evaluated steps are unevenly spaced (warm-up, then
        every ``interval``-th step)."""
        pts = stream.factors
        out = None
        for j, (sj, yj) in enumerate(pts):
            w = 1.0
            for m, (sm, _) in enumerate(pts):
                if m != j:
                    w *= (step - sm) / (sj - sm)
            out = yj * w if out is None else out + yj * w
        return out
