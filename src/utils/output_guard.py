"""Guarding a run's output folder before training: one run at a time, never over another run's results.

* :class:`OutputLock`: an exclusive ``fcntl.flock`` on ``DIR/.run.lock``, held for the whole run. The kernel
  drops it when the process ends (even on SIGKILL), so a crashed run never leaves a stale lock; the file
  says who holds it (pid, host, start time) for the message of a run that finds it taken. flock is per
  host on most network file systems: two hosts writing one folder are not caught there.
* :func:`check_writable`: the output folder and the checkpoint folders take a file (a probe written and
  removed) before anything is built, not at the first checkpoint save, after hours of training.
* :func:`check_previous_run`: a folder that already holds a run (its ``config.yaml``, ``metrics.json`` or
  checkpoints) is refused unless the new run resumes from it (``ckpt_path=`` inside it, or Lightning's
  ``last``) or the user says ``paths.overwrite=true``, which clears its checkpoints and metrics.json first
  (no stale ``step_*.ckpt`` beside the new run's).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Self

__all__ = ["OutputFolderInUse", "OutputLock", "OutputNotWritable", "check_previous_run", "check_writable"]

LOCK_FILE = ".run.lock"
RUN_MARKERS = ("config.yaml", "metrics.json")  # written by every src.train run (start, end)
CHECKPOINTS = "checkpoints"
_SPECIAL_CKPT_PATHS = ("last", "hpc", "registry")  # Lightning finds these in the run's own folder


class OutputFolderInUse(RuntimeError):
    """The output folder is held by a live run, or holds a finished or stopped one."""


class OutputNotWritable(OSError):
    """A folder the run writes into does not take files."""


def check_writable(folders: dict[str, str | Path]) -> None:
    """Raise :class:`OutputNotWritable` naming each `{config key: folder}` that does not take a file (a folder
    not made yet: its nearest existing parent, where the run will make it)."""
    problems = []
    for key, folder in folders.items():
        probe = Path(folder).absolute()
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            with tempfile.TemporaryFile(dir=probe):
                pass
        except OSError as e:
            problems.append(f"{key}={str(folder)!r} is not writable ({probe}: {e.strerror or e})")
    if problems:
        raise OutputNotWritable("; ".join(problems) + ": the run would crash at its first save, losing every "
                                "step before it. Make it writable or pick another folder")


class OutputLock:
    """Exclusive lock on an output folder for the life of a run (use as a context manager)."""

    def __init__(self, output_dir: str | Path) -> None:
        self.dir = Path(output_dir)
        self.path = self.dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> Self:
        import fcntl

        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputFolderInUse(
                f"paths.output_dir={str(self.dir)!r} is in use by another run ({holder}): two runs in one "
                "folder overwrite each other's checkpoints and metrics. Wait for it to end, or pick another "
                "paths.output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')}"
    return "holder unknown"


def _holds_run(out: Path) -> list[str]:
    found = [name for name in RUN_MARKERS if (out / name).exists()]
    ckpts = out / CHECKPOINTS
    if ckpts.is_dir() and any(not p.name.startswith(".") for p in ckpts.iterdir()):
        found.append(f"{CHECKPOINTS}/")
    return found


def _resumes_from(out: Path, ckpt_path: str | None) -> bool:
    if not ckpt_path:
        return False
    if str(ckpt_path) in _SPECIAL_CKPT_PATHS:
        return True
    return Path(ckpt_path).resolve().is_relative_to(out.resolve())


def check_previous_run(output_dir: str | Path, ckpt_path: str | None, overwrite: bool) -> None:
    """Refuse a new run into a folder holding another run's results (see module docstring); with
    ``overwrite`` clear that run's checkpoints and metrics.json instead."""
    out = Path(output_dir)
    found = _holds_run(out) if out.is_dir() else []
    if not found or _resumes_from(out, ckpt_path):
        return
    if not overwrite:
        raise OutputFolderInUse(
            f"paths.output_dir={str(out)!r} holds a finished or stopped run ({', '.join(found)}): a new run "
            "there would overwrite its metrics and mix its checkpoints with the old ones. Resume it with "
            f"ckpt_path={out / CHECKPOINTS / 'last.ckpt'}, pick another paths.output_dir, or replace it "
            "with paths.overwrite=true")
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    (out / "metrics.json").unlink(missing_ok=True)
