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
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


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


def save_checkpoint(run_dir: Path, stage: str, step: int, modules: dict[str, torch.nn.Module], state: dict, keep: int = 2) -> Path:
    """Write one checkpoint atomically and point ``latest.json`` at it; keep the newest ``keep``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"{stage}-{step:08d}"
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
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
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


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest.json`` points at, or ``None`` when the run has none yet."""
    ptr = Path(run_dir) / "checkpoints" / "latest.json"
    if not ptr.exists():
        return None
    try:
        name = json.loads(ptr.read_text())["checkpoint"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise CheckpointError(f"{ptr} is corrupt ({exc}); remove it to restart the stage from scratch") from None
    path = ptr.parent / name
    if not path.is_dir():
        raise CheckpointError(f"{ptr} points at {name}, which does not exist")
    return path


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
    """Final weights of a stage (safetensors), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(state_dict_cpu(module), tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
