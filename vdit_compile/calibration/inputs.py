"""Capture the transformer's forward inputs while a pipeline denoises.

Calibration needs the inputs the transformer really sees at each denoising step (latents at
every noise level, timestep, text embeddings), not synthetic ones.  We run the pipeline with a
forward pre-hook on ``pipe.transformer`` that records its keyword arguments (positional ones
are named via ``inspect.signature``), detached; the hook is removed afterwards, so nothing is
patched globally.
"""
from __future__ import annotations

import inspect
from typing import Any, Iterable, Sequence

import torch
from tqdm.auto import tqdm


def _detach(obj: Any, device) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        return t.to(device) if device is not None else t.clone()
    if isinstance(obj, dict):
        return {k: _detach(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detach(v, device) for v in obj)
    return obj


def named_forward_kwargs(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    """Map a call's positional ``args`` to parameter names of ``module.forward`` and merge ``kwargs``."""
    if not args:
        return dict(kwargs)
    try:
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"cannot name the positional arguments of {type(module).__name__}.forward "
            f"({len(args)} positional, keywords {sorted(kwargs)}): {exc}"
        ) from exc
    out = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"{type(module).__name__}.forward takes *{name}; its inputs cannot be captured as kwargs")
        else:
            out[name] = value
    return out


class TransformerInputRecorder:
    """Context manager: record the kwargs of every forward call of ``module`` (hook removed on exit)."""

    def __init__(self, module: torch.nn.Module, device="cpu", every: int = 1, max_calls: int | None = None):
        if every < 1:
            raise ValueError(f"every must be >= 1, found {every}")
        self.module, self.device, self.every, self.max_calls = module, device, every, max_calls
        self.records: list[dict] = []
        self.calls = 0
        self._handle = None

    def _hook(self, module, args, kwargs):
        idx = self.calls
        self.calls += 1
        if idx % self.every == 0 and (self.max_calls is None or len(self.records) < self.max_calls):
            self.records.append(_detach(named_forward_kwargs(module, args, kwargs), self.device))
        return None

    def __enter__(self) -> "TransformerInputRecorder":
        self._handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def capture_transformer_inputs(
    pipe,
    prompts: Sequence[str] | str,
    num_inference_steps: int = 4,
    every: int = 1,
    max_calls: int | None = None,
    device="cpu",
    seed: int | None = 0,
    progress: bool = True,
    outputs: list | None = None,
    **pipe_kwargs,
) -> list[dict]:
    """Run ``pipe`` on each prompt and return the transformer's forward kwargs at every call.

    Args:
        pipe: a diffusers-style pipeline with a ``transformer`` attribute.
        prompts: calibration prompts (one pipeline run each).
        num_inference_steps: denoising steps per prompt (few are enough: calibration wants the
            spread of noise levels, not image quality).
        every: keep every ``every``-th transformer call (subsampling the steps).
        max_calls: stop recording after this many calls in total.
        device: where recorded tensors go (``None`` keeps them where they are).
        seed: per-prompt generator seed ``seed + i`` (unless ``generator`` is in ``pipe_kwargs``).
        pipe_kwargs: passed to the pipeline (e.g. ``num_frames``, ``height``, ``guidance_scale``);
            ``output_type="latent"`` is the default when the pipeline accepts it, skipping the VAE.
        outputs: when given, each run's sample is appended to it (detached, on the CPU): the dense reference of
            the output check (:mod:`.output_check`).
    """
    transformer = getattr(pipe, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        raise TypeError(
            f"capture_transformer_inputs expects a pipeline with a .transformer module; "
            f"found {type(pipe).__name__} with transformer={type(transformer).__name__}"
        )
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("capture_transformer_inputs needs at least one prompt, found none")
    recorder = TransformerInputRecorder(transformer, device=device, every=every, max_calls=max_calls)
    with recorder:
        for out in run_prompts(pipe, prompts, num_inference_steps, seed, progress, "calibration prompts", **pipe_kwargs):
            if outputs is not None:
                from .output_check import output_tensor

                outputs.append(output_tensor(out).cpu())
            if max_calls is not None and len(recorder.records) >= max_calls:
                break
    if not recorder.records:
        raise RuntimeError(f"the pipeline ran {len(prompts)} prompt(s) but never called its transformer")
    return recorder.records


def run_prompts(pipe, prompts: Sequence[str], num_inference_steps: int, seed: int | None = 0, progress: bool = True,
                desc: str = "calibration prompts", **pipe_kwargs):
    """Run ``pipe`` on each prompt as calibration does (generator ``seed + i``, ``output_type="latent"`` where
    accepted), yielding each run's output: the capture and the output check's trials see the same runs."""
    params = _call_parameters(pipe)
    if "output_type" in params and "output_type" not in pipe_kwargs:
        pipe_kwargs["output_type"] = "latent"
    for i, prompt in enumerate(tqdm(prompts, desc=desc, disable=not progress)):
        kwargs = dict(pipe_kwargs)
        if seed is not None and "generator" in params and "generator" not in kwargs:
            kwargs["generator"] = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():  # per call, not around the yield: the caller's grad mode stays its own
            out = pipe(prompt=prompt, num_inference_steps=num_inference_steps, **kwargs)
        yield out


def _call_parameters(pipe) -> Iterable[str]:
    try:
        return set(inspect.signature(pipe.__call__).parameters)
    except (TypeError, ValueError):
        return set()


def read_prompts(path) -> list[str]:
    """Prompts from a text file, one per line; blank lines and ``#`` comments are skipped."""
    with open(path, encoding="utf-8") as fh:
        prompts = [ln.strip() for ln in fh if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts (one per line expected)")
    return prompts
