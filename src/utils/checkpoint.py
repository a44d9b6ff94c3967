"""Atomic checkpoint writes: a file or a sharded directory appears complete under its name, or not at all.

Files (``AtomicCheckpointIO``, Lightning's CheckpointIO for every non-sharded save, `last.ckpt` included):
``torch.save`` into a temp file in the same folder, fsync, ``os.replace`` onto the name, fsync the folder.
A crash (even SIGKILL) before the rename leaves the previous checkpoint untouched; a stray
``.<name>.*.tmp`` may remain. Sharded (torch.distributed.checkpoint) directories: every rank writes into
``.<name>.tmp/``, then rank 0 swaps it in with :func:`replace_dir` (see ``src.parallel.FSDP2Strategy``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "atomic_torch_save", "atomic_write", "fsync_dir", "replace_dir"]


def fsync_dir(path: str | Path) -> None:
    """Make a rename in ``path`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """`write(file)` into a temp file beside `path`, fsync, rename onto `path`, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose saves are temp file + fsync + rename (local paths; remote URLs as Lightning)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        if "://" in str(path):  # fsspec URL: Lightning's own transactional write
            return super().save_checkpoint(checkpoint, path)
        atomic_torch_save(checkpoint, path)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def replace_dir(src: str | Path, dst: str | Path) -> None:
    """Put the finished directory ``src`` at ``dst`` (same folder), replacing what was there.

    A new name is one atomic rename. An existing ``dst`` is swapped atomically where the OS can
    (Linux renameat2), else moved aside first (then, for a moment, ``dst`` is absent but never partial)."""
    src, dst = Path(src), Path(dst)
    if not dst.exists() and not dst.is_symlink():
        os.replace(src, dst)
    elif dst.is_dir() and not dst.is_symlink() and _exchange(src, dst):
        shutil.rmtree(src)  # now the old checkpoint
    else:
        old = dst.with_name(f".{dst.name}.old")
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        elif old.exists() or old.is_symlink():
            old.unlink()
        os.replace(dst, old)
        os.replace(src, dst)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    fsync_dir(dst.parent)
