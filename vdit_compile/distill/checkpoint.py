"""Atomic, verifiable checkpoints: never lose what was already written.

A checkpoint is a directory ``RUN/checkpoints/<stage>-<step>/`` holding

* ``<name>.safetensors`` for each module's weights (student, EMA, target, ...);
* ``state.pt``: optimizer and LR-scheduler states, every RNG state (python, numpy, torch CPU, CUDA,
  the sampler's own generator), step, stage and the loss history;
* ``meta.json``: stage, step and the SHA-256 of every file above, so a truncated or corrupt
  checkpoint is refused with a clear error instead of resuming from garbage.

Each directory is written under a temporary name, fsynced and renamed into place; then
``RUN/checkpoints/latest.json`` (the pointer ``--resume`` follows) is replaced atomically the same
way.  A kill at any moment leaves either the previous checkpoint or the new one, never half of one.

Re-saving a name that exists (a resume that ends a stage at the step it was already saved at) never
deletes the old directory first: the new one gets a fresh name (``<stage>-<step>-r1``), the pointer
moves, and only then is the old one pruned, so ``latest.json`` never names a missing directory.  If the
pointer is missing, corrupt or dangling anyway (a run from an older version killed mid-rename, a
directory deleted by hand), :func:`latest_checkpoint` falls back to the newest checkpoint that verifies,
complete temporaries included, and says so with a warning.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_path, atomic_write_bytes, atomic_write_text, remove_stale_temporaries
from ..atomic import fsync_dir as _fsync_dir

__all__ = ["CheckpointError", "atomic_write_bytes", "atomic_write_text", "save_checkpoint", "latest_checkpoint",
           "verify_checkpoint", "load_checkpoint", "save_weights", "rng_state", "set_rng_state", "state_dict_cpu"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state(generator: torch.Generator | None = None) -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if generator is not None:
        state["sampler"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "sampler" in state:
        generator.set_state(state["sampler"])


def state_dict_cpu(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of a module's tensors (safetensors refuses shared or strided storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def _free_name(root: Path, base: str) -> str:
    """``base``, or ``base-rK`` for the first K whose directory does not exist yet."""
    name, k = base, 0
    while (root / name).exists():
        k += 1
        name = f"{base}-r{k}"
    return name


def save_checkpoint(run_dir: Path, stage: str, step: int, modules: dict[str, torch.nn.Module], state: dict, keep: int = 2) -> Path:
    """Write one checkpoint atomically and point ``latest.json`` at it; keep the newest ``keep``.

    Order: complete temporary directory -> fsync -> rename to a name that does not exist yet ->
    replace ``latest.json`` -> prune.  No step deletes anything the pointer names.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = _free_name(root, f"{stage}-{step:08d}")
    final = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        hashes = {}
        for key, module in modules.items():
            f = tmp / f"{key}.safetensors"
            save_file(state_dict_cpu(module), str(f))
            hashes[f.name] = _sha256(f)
        buf = io.BytesIO()
        torch.save(state, buf)
        with open(tmp / "state.pt", "wb") as fh:
            fh.write(buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        hashes["state.pt"] = _sha256(tmp / "state.pt")
        meta = {"stage": stage, "step": step, "modules": sorted(modules), "sha256": hashes}
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2))
        _fsync_dir(tmp)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / "latest.json", json.dumps({"checkpoint": name, "stage": stage, "step": step}) + "\n")
    _prune(root, keep, protect=name)
    return final


def _prune(root: Path, keep: int, protect: str) -> None:
    ckpts = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.stat().st_mtime)
    for p in ckpts[:-keep] if keep > 0 else []:
        if p.name != protect:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.iterdir():  # temporaries left by a kill mid-write
        if p.is_dir() and p.name.startswith("."):
            shutil.rmtree(p, ignore_errors=True)
    remove_stale_temporaries(root, "latest.json")


def _verifies(path: Path) -> bool:
    try:
        verify_checkpoint(path)
        return True
    except CheckpointError:
        return False


def _recover(root: Path, why: str) -> Path | None:
    """The newest checkpoint directory under ``root`` that verifies (complete temporaries included).

    A complete temporary is renamed into place under a fresh name and ``latest.json`` is rewritten to
    point at the recovered directory, so the next resume follows the pointer again.
    """
    dirs = [p for p in root.iterdir() if p.is_dir() and (p / "meta.json").is_file()]
    for p in sorted(dirs, key=lambda d: (d / "meta.json").stat().st_mtime, reverse=True):
        if not _verifies(p):
            continue
        meta = json.loads((p / "meta.json").read_text())
        if p.name.startswith("."):  # a complete checkpoint whose rename was cut off
            final = root / _free_name(root, f"{meta['stage']}-{int(meta['step']):08d}")
            os.replace(p, final)
            _fsync_dir(root)
            p = final
        atomic_write_text(root / "latest.json",
                          json.dumps({"checkpoint": p.name, "stage": meta["stage"], "step": meta["step"]}) + "\n")
        remove_stale_temporaries(root, "latest.json")
        warnings.warn(f"{root / 'latest.json'}: {why}; resuming from the newest complete checkpoint, {p.name} "
                      f"(stage {meta['stage']}, step {meta['step']})", stacklevel=3)
        return p
    return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint: the one ``latest.json`` points at, or ``None`` when the run has none.

    When the pointer is missing, unreadable or dangling (a kill between renames), the newest checkpoint
    that verifies is used instead, with a warning; :class:`CheckpointError` only when there is none.  A
    pointer to an existing directory is returned as is: :func:`verify_checkpoint` then refuses it if its
    files do not match their hashes (disk corruption is reported, not silently skipped).
    """
    root = Path(run_dir) / "checkpoints"
    ptr = root / "latest.json"
    if not ptr.exists():
        return _recover(root, "missing") if root.is_dir() else None
    try:
        name = json.loads(ptr.read_text())["checkpoint"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        why = f"is corrupt ({exc})"
    else:
        path = root / name
        if path.is_dir():  # verified by the caller: a corrupt one is refused, never silently skipped
            return path
        why = f"points at {name}, which does not exist"
    found = _recover(root, why)
    if found is None:
        raise CheckpointError(f"{ptr} {why}, and no other complete checkpoint is in {root}; "
                              "restart the stage (remove the checkpoints directory) or pass --overwrite")
    return found


def verify_checkpoint(path: Path) -> dict:
    """Check every file's hash against ``meta.json``; return the metadata or raise :class:`CheckpointError`."""
    path = Path(path)
    meta_f = path / "meta.json"
    try:
        meta = json.loads(meta_f.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} has no readable meta.json ({exc})") from None
    for fname, digest in meta.get("sha256", {}).items():
        f = path / fname
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {fname} is missing")
        if _sha256(f) != digest:
            raise CheckpointError(f"checkpoint {path} is corrupt: {fname} does not match its recorded SHA-256")
    return meta


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module], map_location="cpu") -> dict:
    """Verify, then load the modules' weights in place; return the ``state.pt`` dictionary."""
    meta = verify_checkpoint(path)
    missing = sorted(set(modules) - set(meta["modules"]))
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks weights for {missing} (it holds {meta['modules']})")
    for key, module in modules.items():
        sd = load_file(str(Path(path) / f"{key}.safetensors"))
        module.load_state_dict(sd)
    return torch.load(Path(path) / "state.pt", map_location=map_location, weights_only=False)


def save_weights(path: Path, module: torch.nn.Module, metadata: dict | None = None) -> None:
    """Final weights of a stage (safetensors), written atomically (temporary + fsync + rename)."""
    with atomic_path(path) as tmp:
        save_file(state_dict_cpu(module), str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
