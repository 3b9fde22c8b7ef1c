"""Running calibration over the recorded inputs: a progress bar, and statistics that survive ``kill -9``.

:func:`run_calibration_passes` feeds the inputs to the model (whose sites feed their calibrators), with a
tqdm bar over the transformer calls showing the sites seen, the step's timestep and an ETA. With a
checkpoint path it saves, after every finished call, every calibrator's statistics and the discovered sites
(temp file + fsync + rename: the file is always a whole checkpoint); a later run with the same path and the
same inputs/settings skips the calls already accumulated, so an interrupted calibration loses at most the
call (all sites of one transformer call) that was running. The mass method's verification pass is
checkpointed the same way.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

CHECKPOINT_FORMAT = "vdit-calibration-checkpoint-v1"


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` to ``path`` through a temporary file, fsync'ed, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - directories cannot be fsync'ed on some platforms
        pass


def checkpoint_key(model, num_inputs: int, config) -> dict:
    """What must match for a checkpoint to be resumed: the model's structure and the statistics' settings."""
    from ..plans.fingerprint import model_fingerprint

    return {"fingerprint": model_fingerprint(model), "num_inputs": int(num_inputs),
            "families": list(getattr(config, "families", ("tile",))),
            "candidates": list(getattr(config, "candidates", None) or []),
            "tile_tokens": getattr(config, "tile_tokens", None)}


def load_checkpoint(path, key: dict) -> dict | None:
    """The saved checkpoint at ``path`` (``None`` when there is none); a clear error when it is for other work."""
    path = Path(path)
    if not path.is_file():
        return None
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a vdit-compile calibration checkpoint (format {ck.get('format') if isinstance(ck, dict) else type(ck).__name__!r})")
    if ck["key"] != key:
        diff = {k: (ck["key"].get(k), v) for k, v in key.items() if ck["key"].get(k) != v}
        raise ValueError(f"calibration checkpoint {path} was made for other work (saved vs now: {diff}); "
                         "delete it or pass another checkpoint path")
    return ck


def run_calibration_passes(module, inputs: Sequence, state, call: Callable, config, progress: bool = True) -> None:
    """Run ``inputs`` through ``module`` in calibrate mode, then the verification pass if the calibrators ask
    for one (:func:`~.run.prepare_verification`), with progress and an optional checkpoint
    (``config.calib_checkpoint``)."""
    from .run import prepare_verification

    path = getattr(config, "calib_checkpoint", None)
    key = checkpoint_key(module, len(inputs), config) if path else None
    ck = load_checkpoint(path, key) if path else None
    phase, done = "stats", 0
    if ck is not None:
        state.calibrators.update(ck["calibrators"])
        for s in ck["sites"]:
            state.record_site(s)
        phase, done = ck["phase"], ck["done"]

    def save(ph: str, n: int) -> None:
        if path:
            atomic_save({"format": CHECKPOINT_FORMAT, "key": key, "phase": ph, "done": n,
                         "calibrators": state.calibrators, "sites": state.site_list()}, path)

    def run(ph: str, start: int, desc: str) -> None:
        bar = tqdm(total=len(inputs), initial=start, desc=desc, unit="call", disable=not progress or len(inputs) < 2)
        try:
            with torch.no_grad():
                for i in range(start, len(inputs)):
                    call(module, inputs[i])
                    save(ph, i + 1)
                    t = _timestep_of(state)
                    bar.set_postfix_str(f"{len(state.calibrators)} site(s)" + (f", t={t:g}" if t is not None else ""),
                                        refresh=False)
                    bar.update(1)
        finally:
            bar.close()

    if phase == "stats":
        run("stats", done, "calibrating attention")
        if not prepare_verification(state.calibrators, config):
            return
        phase, done = "verify", 0
        save("verify", 0)
    if phase == "verify":
        run("verify", done, "verifying masks")


def _timestep_of(state):
    from ..runtime.timestep import call_timestep

    try:
        return call_timestep(state.root, *state.call)
    except Exception:  # noqa: BLE001 - the bar's label only
        return None
