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
import errno
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = [
    "AtomicCheckpointIO",
    "UnsafeCheckpoint",
    "atomic_torch_save",
    "atomic_write",
    "check_sharded_metadata",
    "checkpoint_tensors",
    "fsync_dir",
    "read_checkpoint",
    "replace_dir",
]

META_FILE = "meta.pt"  # Lightning's sharded checkpoints keep everything but tensors here


def fsync_dir(path: str | Path) -> None:
    """Make a rename in ``path`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def process_umask() -> int:
    """The process umask, read without changing it (/proc on Linux; elsewhere set and restored at once)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """`write(file)` into a temp file beside `path`, fsync, rename onto `path`, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~process_umask())  # mkstemp makes it 0600: give it the mode open() would
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        full = _out_of_space(path.parent, e)  # before the partial temp file is removed (it filled the disk)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if full:
            raise OSError(errno.ENOSPC, f"no space left on {path.parent} while writing {path.name} "
                                        f"({type(e).__name__}: {e}); the previous {path.name} is kept") from e
        raise
    fsync_dir(path.parent)


_NEARLY_FULL = 1 << 20  # bytes: less than this left beside a failed write means the disk filled up


def _out_of_space(folder: Path, e: BaseException) -> bool:
    """Whether a failed write ran out of space: ENOSPC / EDQUOT, or (torch's zip writer reports a short write
    as "unexpected pos", no errno) an error while the folder's file system is full."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(e, (OSError, RuntimeError)):
        return False
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < _NEARLY_FULL


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


# ---- reading ------------------------------------------------------------------------------------------
class UnsafeCheckpoint(ValueError):
    """A checkpoint whose pickle names code (a class or function beyond tensors and plain containers)."""


class UnreadableCheckpoint(RuntimeError):
    """A truncated or corrupted checkpoint; the message names the newest intact one beside it."""


# torch.distributed.checkpoint reads a sharded directory's `.metadata` with plain `pickle.load` (torch's
# weights-only unpickler cannot read its protocol-4 frames), so it is checked first with an unpickler that
# resolves only the globals DCP's own metadata is made of.
_DCP_MODULES = frozenset({"torch.distributed.checkpoint.metadata"})
_DCP_GLOBALS = frozenset({("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                          ("torch.serialization", "_get_layout"), ("torch", "Size"),
                          ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                          ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")})


class _DCPMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = (module in _DCP_MODULES or (module, name) in _DCP_GLOBALS
                   or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))
        if not allowed:
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed")
        return super().find_class(module, name)


def check_sharded_metadata(path: str | Path, key: str = "ckpt_path") -> None:
    """Refuse (:class:`UnsafeCheckpoint`) a sharded checkpoint directory whose `.metadata` pickle names
    anything beyond torch.distributed.checkpoint's metadata types, before DCP unpickles it."""
    meta = Path(path) / ".metadata"
    if not meta.is_file():
        return
    try:
        with open(meta, "rb") as f:
            _DCPMetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpoint(_refusal(path, key, e)) from None


def _refusal(path: str | Path, key: str, e: Exception) -> str:
    # torch's message advises turning weights-only off, which is what must not happen: name the global only.
    found = re.search(r"GLOBAL ([\w.]+)", str(e))
    refused = f"it asks for {found.group(1)}" if found else (str(e).splitlines() or [""])[0][:200]
    return (f"{key}={str(path)!r}: refused to load: the checkpoint holds pickled objects other than tensors "
            f"and plain values, which could run code when loaded ({refused}). Checkpoints are read "
            "weights-only; re-save it from trusted code with plain types only.")


def read_checkpoint(path: str | Path, key: str = "ckpt_path") -> dict:
    """A `.ckpt` file whole, or a sharded directory's `meta.pt` (everything but the tensors). Read once per
    checkpoint; a missing path names `key`.

    Loaded weights-only (``torch.load(weights_only=True)``): tensors, numbers, strings and containers only,
    so a crafted file cannot run code while it is read; anything else is refused with
    :class:`UnsafeCheckpoint` naming the path and the global the pickle asked for."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{key}={str(path)!r} does not exist (a .ckpt file or a sharded checkpoint dir)")
    if p.is_dir():
        check_sharded_metadata(p, key)
    meta = p / META_FILE if p.is_dir() else p
    if not meta.is_file():
        return {}
    try:
        return _load(meta)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpoint(_refusal(path, key, e)) from None
    except (RuntimeError, EOFError) as e:  # a truncated or corrupted file
        intact = newest_intact_checkpoint(p.parent, skip=p)
        hint = (f"the newest intact checkpoint beside it is {intact}: use {key}={intact}" if intact
                else "no intact step_*.ckpt beside it")
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UnreadableCheckpoint(f"{key}={str(path)!r} cannot be read (truncated or corrupted: {first}); "
                                   f"{hint}") from None


def _load(meta: Path) -> dict:
    try:  # memory-mapped: every rank of an SFT start reads it, and optimiser states are never touched
        return torch.load(meta, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:  # legacy (non-zip) format cannot be mapped
        if "mmap" not in str(e):
            raise
        return torch.load(meta, map_location="cpu", weights_only=True)


def newest_intact_checkpoint(folder: str | Path, skip: Path | None = None) -> Path | None:
    """The newest `step_*.ckpt` file in `folder` that reads (zero-padded step names sort in step order);
    memory-mapped, so a check costs the archive's index, not its tensors."""
    for candidate in sorted(Path(folder).glob("step_*.ckpt"), reverse=True):
        if not candidate.is_file() or (skip is not None and candidate.resolve() == skip.resolve()):
            continue
        try:
            _load(candidate)
        except Exception:  # noqa: BLE001, S112 - any failure to read means not intact
            continue
        return candidate
    return None


def checkpoint_tensors(path: str | Path, checkpoint: dict, key: str = "ckpt_path") -> dict[str, torch.Tensor]:
    """The model tensors of a checkpoint by state-dict name, without a model to load them into: a `.ckpt`'s
    `state_dict`, or every model entry of a sharded (torch.distributed.checkpoint) directory, read in one
    process (each tensor whole)."""
    if "state_dict" in checkpoint:
        return dict(checkpoint["state_dict"])
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    try:
        names = [k for k in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
                 if k.startswith("state_dict.")]
        loaded = _load_state_dict_from_keys(set(names), checkpoint_id=str(path))
    except Exception as e:  # DCP's own message says what is wrong with the directory
        raise RuntimeError(f"{key}={str(path)!r}: not a readable sharded checkpoint: {e}") from e
    state = loaded.get("state_dict", loaded)
    return {k.removeprefix("state_dict."): v for k, v in _flat(state).items()}


def _flat(tree: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out
