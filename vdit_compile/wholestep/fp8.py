"""FP8 linears: dynamic per-row float8 (e4m3) activations x float8 weights through torchao.

Why torchao: its ``Float8DynamicActivationFloat8WeightConfig`` swaps a linear's weight for a float8
tensor subclass whose matmul quantises the activation per token at run time; under
``torch.compile`` (inductor, which ``optimize`` uses on CUDA) the quantisation fuses into the
producer kernels, which is what makes FP8 pay off (eager quantisation eats the matmul gain).

Which linears: every ``nn.Linear`` except

* the ones that should stay in high precision by role (``KEEP_PATTERNS``: patch/condition/time/text
  embeddings, the final norm and projection) plus the user's ``fp8_keep`` globs;
* the ones that read only the condition tokens (``CONDITION_PATTERNS``: cross-attention keys and values):
  too few rows for FP8 to gain anything;
* the ones whose sizes an FP8 GEMM cannot take (in and out features must be multiples of 16);
* the ones the error check rejects: the relative L2 error of the emulated FP8 matmul (per-row
  e4m3 scales for activations and weights, exactly what torchao computes, accumulated in fp32) on
  recorded activations (or Gaussian ones without example inputs) above ``fp8_max_error``.

The choice (quantised names, kept names with their reason and error) goes to the report.
``emulate`` mode gives the same linears a quantise-dequantise forward on any device: it
measures FP8's *quality* cost on CPU, never its speed.  Everything is undone by ``restore``.
"""
from __future__ import annotations

import fnmatch
import types
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .._optional import MissingDependencyError, install_hint, require

#: Linears kept in high precision by role (glob patterns on module names).
KEEP_PATTERNS = ("patch_embedding*", "condition_embedder.*", "*time_embed*", "*time_proj*", "*text_embed*",
                 "*timestep_embed*", "*caption_projection*", "proj_out", "norm_out*", "*pos_embed*", "*x_embedder*",
                 "*context_embedder*")
#: Linears that read only the condition tokens (text, image embeddings) kept in high precision: their M is the
#: condition's length (512 text tokens against 86,400 video tokens at 93f 720p), so an FP8 GEMM saves nothing and its
#: quantisation is pure overhead, while their error reaches every query's cross-attention (the embedded model with
#: FP8 emulated, 16 prompts x 50 steps: 37.3 dB vs fp32 with them in FP8, 38.0 dB kept; 2026-12-07).
CONDITION_PATTERNS = ("*attn2.to_k", "*attn2.to_v", "*add_k_proj", "*add_v_proj", "*attn2.to_kv", "*to_added_kv")
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
MODES = ("off", "on", "auto", "emulate")
MIN_TORCHAO = "0.10"


class Fp8UnsupportedError(RuntimeError):
    """FP8 linears were asked for on a device / install that cannot run them."""


def normalize_mode(value) -> str:
    if value is None or value is False:
        return "off"
    if value is True:
        return "on"
    if value in MODES:
        return value
    raise ValueError(f"fp8 must be False, True, 'off', 'on', 'auto' or 'emulate'; found {value!r}")


# ---------------------------------------------------------------------------------------------- numerics
def quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """Quantise-dequantise ``x`` to float8 e4m3 with one scale per row (last dim reduced), like torchao PerRow."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    scale = FP8_MAX / amax
    q = (xf * scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.float() / scale


def emulated_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The FP8 linear's numerics in fp32: per-token activations, per-output-channel weights."""
    y = F.linear(quantize_rows(x), quantize_rows(weight), None)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@torch.no_grad()
def fp8_error(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> float:
    """Relative L2 error of the FP8 linear against the fp32 one on activations ``x`` (..., in)."""
    x = x.reshape(-1, x.shape[-1]).float()
    ref = F.linear(x, weight.float(), None if bias is None else bias.float())
    err = emulated_linear(x, weight.float(), bias) - ref
    return float(err.norm() / ref.norm().clamp(min=1e-30))


def _emulated_forward(self, x):
    """Instance-level ``forward`` of an emulated FP8 linear (the module tree and names stay as they are,
    so PEFT / LoRA still finds ``nn.Linear`` targets by name)."""
    return emulated_linear(x, self.weight, self.bias)


# ---------------------------------------------------------------------------------------------- choice
@dataclass
class Fp8Choice:
    """Which linears run in FP8 (``quantized``) and which stay (``kept``: name -> reason)."""

    mode: str
    quantized: list = field(default_factory=list)
    kept: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)  # name -> emulated relative error (checked linears)
    max_error: float = 0.0
    activations: str = "gaussian"  # "recorded" when example inputs were run
    note: str = ""

    def as_dict(self) -> dict:
        return {"mode": self.mode, "quantized": list(self.quantized), "kept": dict(self.kept),
                "max_error": self.max_error, "activations": self.activations,
                "errors": {k: round(v, 6) for k, v in self.errors.items()}, "note": self.note}


def _linears(module: torch.nn.Module):
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear) and type(m).__module__.startswith("torch.nn"):
            yield name, m


def record_activations(module: torch.nn.Module, run, max_rows: int = 2048) -> dict:
    """Run ``run()`` with forward pre-hooks on every linear; returns name -> up to ``max_rows`` input rows."""
    store: dict = {}
    handles = []

    def hook_for(name):
        def hook(_m, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            if x.shape[0] > max_rows:
                x = x[torch.linspace(0, x.shape[0] - 1, max_rows, device=x.device).long()]
            store.setdefault(name, x.float().cpu())
        return hook

    for name, m in _linears(module):
        handles.append(m.register_forward_pre_hook(hook_for(name)))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return store


def choose_linears(module: torch.nn.Module, mode: str, keep=(), max_error: float = 0.05,
                   activations: dict | None = None, seed: int = 0, unused=()) -> Fp8Choice:
    """Decide, per ``nn.Linear``, FP8 or high precision (see the module doc); ``unused``: names of linears that do
    not run (replaced by fused projections, :mod:`.fusion`), left as they are."""
    choice = Fp8Choice(mode, max_error=max_error, activations="recorded" if activations else "gaussian")
    patterns = tuple(KEEP_PATTERNS) + tuple(keep or ())
    gen = torch.Generator().manual_seed(seed)
    unused = set(unused)
    for name, lin in _linears(module):
        if name in unused:
            choice.kept[name] = "replaced by a fused projection (not run while fused)"
            continue
        pat = next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)
        if pat is not None:
            choice.kept[name] = f"high precision by role (matches {pat!r})"
            continue
        pat = next((p for p in CONDITION_PATTERNS if fnmatch.fnmatchcase(name, p)), None)
        if pat is not None:
            choice.kept[name] = f"reads only the condition tokens (matches {pat!r}): too few rows for FP8 to gain"
            continue
        if lin.in_features % 16 or lin.out_features % 16:
            choice.kept[name] = f"sizes {lin.in_features}x{lin.out_features} are not multiples of 16 (FP8 GEMM)"
            continue
        x = (activations or {}).get(name)
        if x is None:
            x = torch.randn(256, lin.in_features, generator=gen)
        dev = lin.weight.device  # the check runs where the weights are (GPU for large models)
        err = fp8_error(x.to(dev), lin.weight.detach(), None if lin.bias is None else lin.bias.detach())
        choice.errors[name] = err
        if not err <= max_error:
            choice.kept[name] = f"error check: relative error {err:.4f} > fp8_max_error {max_error}"
            continue
        choice.quantized.append(name)
    return choice


# ---------------------------------------------------------------------------------------------- apply
def device_supports_fp8(device: torch.device) -> tuple[bool, str]:
    """FP8 GEMMs need CUDA compute capability 8.9+ (Ada, Hopper and later)."""
    if device.type != "cuda":
        return False, f"FP8 linears need a CUDA GPU of compute capability 8.9+ (sm89+); the model is on {device.type}"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return False, f"FP8 linears need compute capability 8.9+ (sm89+); {torch.cuda.get_device_name(device)} is sm{cap[0]}{cap[1]}"
    return True, ""


def torchao_status() -> tuple[bool, str]:
    try:
        quant = require("torchao.quantization", why=f"FP8 linears (torchao>={MIN_TORCHAO})")
    except MissingDependencyError as exc:
        return False, str(exc)
    if not all(hasattr(quant, n) for n in ("Float8DynamicActivationFloat8WeightConfig", "quantize_")):
        return False, (f"FP8 linears need torchao>={MIN_TORCHAO}; the installed one lacks Float8DynamicActivationFloat8"
                       f"WeightConfig. Install it with: {install_hint('fp8')}")
    return True, ""


def resolve_mode(mode: str, device: torch.device) -> tuple[str, str]:
    """``on`` -> ``on`` or a clear error; ``auto`` -> ``on`` or ``off`` with a warning; returns (mode, why)."""
    if mode in ("off", "emulate"):
        return mode, ""
    ok, why = device_supports_fp8(device)
    if ok:
        ok, why = torchao_status()
    if ok:
        return "on", ""
    if mode == "on":
        raise Fp8UnsupportedError(why + "; use fp8='auto' to fall back to bf16 with a warning, or fp8='emulate' "
                                  "to study FP8's quality on any device")
    warnings.warn(f"vdit-compile: fp8='auto': every linear stays in its own dtype: {why}", stacklevel=3)
    return "off", why


class Fp8Linears:
    """The applied FP8 swap of one model; :meth:`undo` puts every original weight / module back."""

    def __init__(self, module: torch.nn.Module, choice: Fp8Choice):
        self.module, self.choice = module, choice
        self._weights: dict = {}  # name -> (linear, original weight Parameter)  ("on")
        self._emulated: list = []  # linears whose forward is the emulated one   ("emulate")

    def apply(self) -> Fp8Linears:
        names = set(self.choice.quantized)
        if not names:
            return self
        if self.choice.mode == "emulate":
            for name in self.choice.quantized:
                lin = self.module.get_submodule(name)
                lin.__dict__["forward"] = types.MethodType(_emulated_forward, lin)
                self._emulated.append(lin)
            return self
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            PerRow,
            quantize_,
        )

        lins = dict(_linears(self.module))
        self._weights = {n: (lins[n], lins[n].weight) for n in names}
        try:
            # set_inductor_config=False: torchao would otherwise switch on inductor's coordinate-descent tuning
            # (and more) for the whole process and never switch it back; that tuning made the FP8 compile of a
            # 4-layer OSP slice take 263-286 s against 16 s in bf16 (BENCHMARKS runs 11-12).  Inductor's settings
            # belong to the user, not to one optimised model.
            quantize_(self.module, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(),
                                                                            set_inductor_config=False),
                      filter_fn=lambda _m, fqn: fqn in names)
        except BaseException:
            self.undo()
            raise
        return self

    def undo(self) -> None:
        for lin, weight in self._weights.values():
            lin.weight = weight
        for lin in self._emulated:
            lin.__dict__.pop("forward", None)
        self._weights.clear()
        self._emulated.clear()
