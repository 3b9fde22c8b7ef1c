"""Up-front checks of user input: bad values fail with one clear sentence before any long work starts.

Each check names what was expected and what was found.  They run at the top of
:func:`vdit_compile.optimize`, in ``OptimizeConfig.__post_init__``, in the CLI's argument types and in
every call of an optimised model (:func:`check_forward_inputs`), so that a wrong path, device, prompt
or number is reported before calibration, export or distillation spends minutes, and never as a
Dynamo fake-tensor traceback.  docs/guarantees.md lists what is checked and the tests that hold it.
"""
from __future__ import annotations

import argparse
import math
import numbers
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch


# ----------------------------------------------------------------------------------------- numbers
def check_number(name: str, value: Any, *, minimum: float | None = None, maximum: float | None = None,
                 min_open: bool = False, integer: bool = False, allow_none: bool = False,
                 allow_inf: bool = False) -> Any:
    """``value`` if it is a real number (an int when ``integer``) within the bounds, else ``ValueError``/``TypeError``.

    Strings, booleans and NaN are refused (a budget of ``"0.05"`` or ``nan`` would otherwise fail deep
    inside calibration, or compare false everywhere and silently pick nothing).
    """
    if value is None and allow_none:
        return None
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        raise TypeError(f"{name} must be {kind}, found {type(value).__name__} {value!r}")
    if math.isnan(value):
        raise ValueError(f"{name} must be {kind}, found NaN")
    if math.isinf(value) and not allow_inf:
        raise ValueError(f"{name} must be finite, found {value}")
    if minimum is not None and (value <= minimum if min_open else value < minimum):
        raise ValueError(f"{name} must be {'>' if min_open else '>='} {minimum:g}, found {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum:g}, found {value!r}")
    return value


def check_error_budget(value: Any, name: str = "error_budget") -> float:
    """A budget >= 0; a budget >= 1 (or inf) is allowed but warned about: it accepts every mask."""
    check_number(name, value, minimum=0, allow_inf=True)
    if value >= 1:
        warnings.warn(f"{name}={value:g}: a relative error of 1 is what dropping the whole attention output costs, "
                      "so every candidate mask fits this budget and calibration picks the sparsest ones regardless of "
                      "quality; expected a budget below 1 (the default is 0.05)", stacklevel=3)
    return float(value)


def check_candidates(candidates: Any, name: str = "candidates") -> list[str] | None:
    """``None`` (default family) or a non-empty list of mask names; a bare string is refused."""
    if candidates is None:
        return None
    if isinstance(candidates, (str, bytes)):
        raise TypeError(f"{name} must be a list of mask names such as ['g1w0', 'dense'], found the string "
                        f"{candidates!r}: wrap it in a list")
    names = list(candidates)
    if not names:
        raise ValueError(f"{name} must name at least one mask (e.g. ['g1w0', 'dense']) or be None for the default "
                         "family; found an empty list")
    bad = [c for c in names if not isinstance(c, str)]
    if bad:
        raise TypeError(f"{name} must be mask names (str), found {bad!r}")
    return names


def check_site_patterns(sites: Any) -> None:
    """A site filter is ``None``, a callable, or a list of glob patterns (a bare string is refused)."""
    if sites is None or callable(sites):
        return
    if isinstance(sites, (str, bytes)):
        raise TypeError(f"sites must be a list of glob patterns such as ['blocks.*.attn1'] or a callable, found the "
                        f"string {sites!r}: wrap it in a list")
    bad = [s for s in sites if not isinstance(s, str)]
    if bad:
        raise TypeError(f"sites must be glob patterns (str), found {bad!r}")


def check_site_filter(config, sites: Iterable) -> None:
    """A site filter that matches none of the tileable sites is an error, not a silently dense model."""
    if getattr(config, "sites", None) is None:
        return
    tileable = [s.name for s in sites if getattr(s, "tileable", False)]
    if tileable and not any(config.site_allowed(n) for n in tileable):
        shown = ", ".join(tileable[:12]) + (", ..." if len(tileable) > 12 else "")
        raise ValueError(f"the sites filter {config.sites!r} matches none of the model's {len(tileable)} tileable "
                         f"attention site(s): expected at least one of {shown}")


# ----------------------------------------------------------------------------------------- paths
def _check_writable_ancestor(start: Path, path: Path, what: str) -> None:
    """The nearest existing ancestor of ``start`` (itself included) must be a writable directory: missing
    directories below it can then be created; a file there, or no write permission, is refused."""
    probe = start
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{what} {path}: expected a path in a directory, but {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: directory {probe} is not writable")


def check_output_file(path: Any, what: str = "output file") -> Path:
    """``path`` as a ``Path`` if a file can be written there; else a ``ValueError`` saying why not.

    Missing parent directories are fine when they can be created; a path that is a directory, lies
    under a file, or in a directory this process cannot write is refused.
    """
    if not isinstance(path, (str, os.PathLike)) or str(path) == "":
        raise TypeError(f"{what}: expected a file path, found {type(path).__name__} {path!r}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path}: expected a file path, found an existing directory")
    _check_writable_ancestor(path.parent, path, what)
    return path


def check_output_dir(path: Any, what: str = "output directory") -> Path:
    """``path`` if it is (or can be created as) a writable directory."""
    if not isinstance(path, (str, os.PathLike)) or str(path) == "":
        raise TypeError(f"{what}: expected a directory path, found {type(path).__name__} {path!r}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path}: expected a directory, found a file")
    _check_writable_ancestor(path, path, what)
    return path


def check_input_file(path: Any, what: str = "input file", text: bool = False) -> Path:
    """``path`` if it is an existing regular file (UTF-8 text when ``text``)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path}: expected a file, found a directory")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if text:
        head = path.read_bytes()[:65536]
        try:
            if b"\0" in head:
                raise UnicodeDecodeError("utf-8", head, head.index(b"\0"), head.index(b"\0") + 1, "NUL byte")
            head.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.end < len(head) - 4:  # not merely a multi-byte character cut at the 64 KiB boundary
                raise ValueError(f"{what} {path}: expected a UTF-8 text file, found binary data "
                                 f"({exc.reason} at byte {exc.start})") from None
    return path


def looks_like_text(path: Path) -> bool:
    """True when the file's first bytes are printable UTF-8 text (used to refuse text where a tensor file belongs)."""
    head = Path(path).read_bytes()[:4096]
    if not head or b"\0" in head or head.startswith(b"PK"):
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# ----------------------------------------------------------------------------------------- devices
def check_device(device: Any) -> torch.device:
    """A ``torch.device`` that exists on this machine (``cuda`` without CUDA is refused up front)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', found {device!r} ({exc})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine (torch {torch.__version__}, "
                             "no GPU visible); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


# ----------------------------------------------------------------------------------------- argparse types
def _arg_type(fn, label: str):
    def parse(text: str):
        try:
            return fn(text)
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = label
    return parse


def _parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected a number, found {text!r}") from None


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected an integer, found {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _arg_type(lambda t: check_number("value", _parse_int(t), minimum=1, integer=True), "positive int")(text)


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _arg_type(lambda t: check_number("value", _parse_int(t), minimum=0, integer=True), "int >= 0")(text)


def budget_float(text: str) -> float:
    """argparse type: an error budget (finite or inf, >= 0; warns at >= 1)."""
    return _arg_type(lambda t: check_error_budget(_parse_float(t), "--budget"), "budget")(text)


def density_float(text: str) -> float:
    """argparse type: a density in (0, 1]."""
    return _arg_type(lambda t: check_number("value", _parse_float(t), minimum=0, min_open=True, maximum=1),
                     "density")(text)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _arg_type(lambda t: check_number("value", _parse_float(t), minimum=0, min_open=True), "positive float")(text)


# ----------------------------------------------------------------------------------------- optimize()
def prompt_list(calib_prompts: Any) -> list[str] | None:
    """Calibration prompts as a list (generators are consumed once, here); a bare string is refused.

    A string is a sequence of characters: iterating it would calibrate on one-letter prompts, and
    ``len()`` would record the character count as the number of prompts.
    """
    if calib_prompts is None:
        return None
    if isinstance(calib_prompts, (str, bytes)):
        raise TypeError(f"calib_prompts must be a list of prompts, found one string {calib_prompts!r}: "
                        f"pass calib_prompts=[{calib_prompts!r}] to calibrate on that one prompt")
    try:
        prompts = list(calib_prompts)
    except TypeError:
        raise TypeError(f"calib_prompts must be a list of prompt strings, found {type(calib_prompts).__name__}") from None
    if not prompts:
        raise ValueError("calib_prompts is empty: expected at least one prompt")
    bad = [(i, type(p).__name__) for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if bad:
        i, t = bad[0]
        raise TypeError(f"calib_prompts[{i}] must be a non-empty prompt string, found {t} {prompts[i]!r}")
    return prompts


def input_list(calib_inputs: Any) -> list | None:
    """Calibration inputs as a list of forward-kwargs dicts (or ``(args, kwargs)`` pairs)."""
    if calib_inputs is None:
        return None
    if isinstance(calib_inputs, dict):
        raise TypeError("calib_inputs must be a list of forward-kwargs dicts, found one dict: "
                        "pass calib_inputs=[kwargs]")
    if isinstance(calib_inputs, (str, bytes, torch.Tensor)):
        raise TypeError(f"calib_inputs must be a list of forward-kwargs dicts, found {type(calib_inputs).__name__}")
    try:
        inputs = list(calib_inputs)
    except TypeError:
        raise TypeError(f"calib_inputs must be a list of forward-kwargs dicts, found {type(calib_inputs).__name__}") from None
    if not inputs:
        raise ValueError("calib_inputs is empty: expected at least one dict of transformer forward kwargs")
    for i, inp in enumerate(inputs):
        pair = isinstance(inp, (tuple, list)) and len(inp) == 2 and isinstance(inp[1], dict)
        if not isinstance(inp, dict) and not pair:
            raise TypeError(f"calib_inputs[{i}] must be a dict of forward kwargs or an (args, kwargs) pair, "
                            f"found {type(inp).__name__}")
    return inputs


def check_pipe_kwargs(kwargs: dict, what: str = "calib_kwargs") -> None:
    """Frame count, size and step count given to a pipeline must be positive integers."""
    for key in ("num_frames", "height", "width", "num_inference_steps", "num_videos_per_prompt"):
        if key in kwargs and kwargs[key] is not None:
            check_number(f"{what}[{key!r}]", kwargs[key], minimum=1, integer=True)


def check_prompts_known(pipe, prompts: list[str]) -> None:
    """Prompts the pipeline's tokenizer would refuse are reported all at once, before the first one runs.

    Only tokenizers that refuse words (the embedded model's closed-vocabulary ``CaptionTokenizer``)
    are asked; subword tokenizers accept any text.
    """
    tok = getattr(pipe, "tokenizer", None)
    if tok is None or getattr(tok, "unknown", None) != "error" or not callable(getattr(tok, "encode", None)):
        return
    problems = []
    for i, p in enumerate(prompts):
        try:
            tok.encode(p)
        except ValueError as exc:
            problems.append((i, exc))
    if problems:
        i, first = problems[0]
        raise ValueError(f"{len(problems)} of {len(prompts)} calibration prompt(s) cannot be tokenized "
                         f"(indices {[j for j, _ in problems]}); nothing was run. First, prompt {i}: {first}")


_COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _floating_param_dtype(module: torch.nn.Module) -> torch.dtype | None:
    """The dtype inputs must have, or ``None`` when it cannot be told from the weights (float8 storage,
    diffusers' layerwise casting hooks that upcast the weights at run time)."""
    if getattr(module, "_diffusers_hook", None) is not None:
        return None
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype if p.dtype in _COMPUTE_DTYPES else None
    return None


_TEXT_WIDTH_KEYS = ("text_dim", "text_embed_dim", "caption_channels", "joint_attention_dim", "cross_attention_dim")


def _named(args: tuple, kwargs: dict) -> dict:
    named = dict(kwargs)
    if args and "hidden_states" not in named and torch.is_tensor(args[0]):
        named["hidden_states"] = args[0]
    return named


def check_forward_inputs(module: torch.nn.Module, args: tuple = (), kwargs: dict | None = None,
                         what: str = "input") -> None:
    """Checks of a transformer call that would otherwise fail inside Dynamo's fake-tensor tracing.

    ``hidden_states`` / ``encoder_hidden_states`` must match the weights' dtype (unless autocast is on),
    ``hidden_states`` must carry the model's ``in_channels`` and every dimension must be non-empty,
    and ``encoder_hidden_states`` must have the text width of the model's config.
    """
    named = _named(args, kwargs or {})
    name = type(module).__name__
    cfg = getattr(module, "config", None)
    wdtype = _floating_param_dtype(module)
    autocast = any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda") if _autocast_query_ok(d))
    for key in ("hidden_states", "encoder_hidden_states"):
        x = named.get(key)
        if not torch.is_tensor(x):
            continue
        if 0 in x.shape:
            raise ValueError(f"{name} {what}: {key} has an empty dimension, shape {tuple(x.shape)}; expected every "
                             "dimension >= 1 (num_frames=0?)")
        if wdtype is not None and x.is_floating_point() and x.dtype != wdtype and not autocast:
            raise TypeError(f"{name} {what}: {key} is {x.dtype} but the model's weights are {wdtype}; expected the "
                            f"same dtype: cast the input (x.to({wdtype})) or the model, or run under torch.autocast")
    x = named.get("hidden_states")
    in_ch = getattr(cfg, "in_channels", None) if cfg is not None else None
    if torch.is_tensor(x) and isinstance(in_ch, int) and "3D" in name and x.ndim != 3:
        if x.ndim != 5:
            raise ValueError(f"{name} {what}: expected hidden_states as a 5-D video latent (batch, channels, frames, "
                             f"height, width), found {x.ndim}-D shape {tuple(x.shape)}")
        if in_ch not in (x.shape[1], x.shape[2]):
            raise ValueError(f"{name} {what}: expected hidden_states with in_channels={in_ch} channels, found shape "
                             f"{tuple(x.shape)}")
    e = named.get("encoder_hidden_states")
    if torch.is_tensor(e) and cfg is not None:
        widths = {k: getattr(cfg, k, None) for k in _TEXT_WIDTH_KEYS}
        widths = {k: v for k, v in widths.items() if isinstance(v, int) and not isinstance(v, bool)}
        if len(set(widths.values())) == 1:
            (key, width), = list(widths.items())[:1]
            if e.shape[-1] != width:
                raise ValueError(f"{name} {what}: expected encoder_hidden_states with {width} features in the last "
                                 f"dimension (config.{key}), found shape {tuple(e.shape)}")


def _autocast_query_ok(device: str) -> bool:
    try:
        torch.is_autocast_enabled(device)
        return True
    except (TypeError, RuntimeError):
        return False


def validate_optimize(pipe, module: torch.nn.Module, calib_prompts, calib_inputs, plan, cfg) -> tuple:
    """Everything :func:`vdit_compile.optimize` can check before it runs the model.

    Returns ``(calib_prompts, calib_inputs)`` as lists (or ``None``).
    """
    prompts, inputs = prompt_list(calib_prompts), input_list(calib_inputs)
    if plan is None and inputs is None and prompts is not None:
        if pipe is None:
            raise ValueError("calib_prompts need a pipeline (an object with .transformer); for a bare transformer "
                             "pass calib_inputs=[forward kwargs, ...] instead")
        check_pipe_kwargs(cfg.calib_kwargs)
        check_prompts_known(pipe, prompts)
    for i, inp in enumerate(inputs or []):
        args, kwargs = ((), inp) if isinstance(inp, dict) else (tuple(inp[0]), inp[1])
        check_forward_inputs(module, args, kwargs, what=f"calib_inputs[{i}]")
    return prompts, inputs
