"""Crash-safe file writes: a kill at any moment leaves the old file or the new one, never a torn one.

Every file vdit-compile writes for the user (plans, ONNX models, distillation state) goes through
here: the data is written to a temporary file *in the same directory* (so the final ``os.replace``
never crosses a file system), flushed and fsynced, then renamed over the destination and the
directory is fsynced so the rename itself survives a power cut.  Temporaries are named
``.<name>.<random>.tmp`` so that listings and globs of the real files skip them.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def fsync_dir(path) -> None:
    """fsync a directory so that renames inside it are durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def fsync_file(path) -> None:
    """fsync a file written by a third-party writer that takes only a path."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _publish(tmp: str, path: Path) -> None:
    """The one step between a complete temporary and the destination: chmod, rename, fsync the dir."""
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_path(path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on clean exit it is fsynced and renamed onto ``path``.

    For writers that only take a file name (``torch.onnx.export``, ``safetensors.save_file``).  On an
    exception (KeyboardInterrupt included) the temporary is removed and ``path`` is untouched.
    ``suffix`` lets writers that look at the extension (ONNX) see the right one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        fsync_file(tmp)
        _publish(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory, fsync and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        _publish(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str, encoding: str = "utf-8") -> None:
    """:func:`atomic_write_bytes` for text."""
    atomic_write_bytes(path, text.encode(encoding))


def remove_stale_temporaries(directory, name: str) -> list[Path]:
    """Delete ``.<name>.*.tmp`` files a killed writer left in ``directory``; return what was removed."""
    removed = []
    for p in Path(directory).glob(f".{name}.*.tmp"):
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed
