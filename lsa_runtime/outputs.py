"""Output directories: one writer at a time, and files that are whole or absent.

Every fm-index command that writes a directory (build-labels, train, evaluate, pipeline) holds an
:class:`OutputLock` on it while it runs; a second writer is refused with one line naming the holder's PID.
Label shards written by ``--shard I/N`` runs share a directory, so their lock is per shard. Files are written
under a temporary name unique to the writing process (:func:`temp_path`) and renamed into place, so a reader
never sees half a file and no two processes write the same temporary file; :func:`remove_stale_temps` clears
the temporaries of writers that no longer run (an interrupted run), never a live writer's.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .errors import FmIndexError

LOCK_PREFIX = ".fm-index"
_TEMP = re.compile(r"\.(\d+)\.tmp(\.[a-z]+)?$")


class OutputLockError(FmIndexError):
    """Another process is writing the same output directory."""


class OutputLock:
    """An exclusive advisory lock on ``directory`` (``part``: a sub-lock, e.g. one shard of a shared directory).

    Use as a context manager. The lock file records the holder's PID and command so that a refused writer can
    say who holds it; the lock itself is the kernel's (``flock``), so it goes away with the holder, even after
    ``kill -9``.
    """

    def __init__(self, directory: str | Path, command: str, part: str | None = None):
        self.directory = Path(directory)
        self.command = command
        self.path = self.directory / (f"{LOCK_PREFIX}.{part}.lock" if part else f"{LOCK_PREFIX}.lock")
        self._file = None

    def __enter__(self) -> "OutputLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no advisory locks
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _holder(handle.read())
            handle.close()
            raise OutputLockError(f"{self.directory} is being written by another fm-index process ({holder}); wait "
                                  f"for it to finish or choose another --out") from None
        except OSError as exc:  # e.g. a file system without locks
            handle.close()
            raise OutputLockError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "command": self.command}) + "\n")
        handle.flush()
        self._file = handle
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the flock
            self._file = None


def _holder(text: str) -> str:
    try:
        blob = json.loads(text)
        return f"PID {blob['pid']}, {blob['command']}"
    except (ValueError, KeyError, TypeError):
        return "PID unknown"


def check_output_dir(out: str | Path, what: str = "--out") -> None:
    """An output directory must be a directory or absent (checked before anything is written)."""
    if Path(out).exists() and not Path(out).is_dir():
        raise FmIndexError(f"{what} {out} exists and is not a directory")


def temp_path(path: str | Path) -> Path:
    """The temporary name this process writes ``path`` under before renaming it, unique per process:
    ``NAME.PID.tmp``, or ``STEM.PID.tmp.png`` for images (matplotlib picks the format by the suffix)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.{os.getpid()}.tmp{path.suffix}" if path.suffix == ".png"
                          else f"{path.name}.{os.getpid()}.tmp")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file (fsynced, then renamed)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temps(directory: str | Path) -> int:
    """Delete temporary files under ``directory`` whose writing process is gone; returns how many."""
    removed = 0
    for path in Path(directory).rglob("*.tmp*"):
        match = _TEMP.search(path.name)
        if match is None or _alive(int(match.group(1))):
            continue
        if path.is_dir():
            import shutil

            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process starts the run: nothing of its own is in flight yet
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
