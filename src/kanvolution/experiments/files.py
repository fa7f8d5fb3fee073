"""Files of a run folder: atomic writes and the lock that gives one folder to one run.

Every file the tooling writes goes through :func:`atomic_write`, so a crash leaves either the
old file or the new one, never half of one. :class:`RunLock` is an OS file lock (``flock``) held
for a run's whole life; the OS drops it when the process dies, however it dies.
"""
from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import KanvolutionError

__all__ = ["LOCK_FILE", "RunFolderError", "RunLock", "atomic_write", "is_locked", "prepare_folder", "write_json"]

LOCK_FILE = ".lock"


class RunFolderError(KanvolutionError, OSError):
    """The output folder cannot be used: another run holds it, it is a file, or it is not writable."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write through ``write(file)`` to a temporary file beside ``path``, then rename it over ``path``.

    Examples:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> atomic_write(p, lambda f: f.write("hello"), mode="w")
        >>> p.read_text()
        'hello'
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """``data`` as indented JSON, written atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2) + "\n"), mode="w")


def prepare_folder(folder: str | os.PathLike[str]) -> Path:
    """Create ``folder`` (and its parents) for writing, or raise :class:`RunFolderError` saying why not."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"{path} is a file, not a folder; choose another output folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise RunFolderError(f"{path}: a part of this path is a file, not a folder") from None
    except PermissionError:
        raise RunFolderError(f"cannot create {path}: permission denied; choose a writable output folder") from None
    except OSError as err:
        raise RunFolderError(f"cannot create {path}: {err.strerror}; choose another output folder") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise RunFolderError(f"cannot write in {path}: permission denied; choose a writable output folder")
    return path


class RunLock:
    """An exclusive ``flock`` on ``FOLDER/.lock``, taken at once or refused.

    Use it as a context manager around everything a run writes into its folder. The lock file
    stays (it is empty but for the holder's pid); only the lock on it comes and goes.

    Examples:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> with RunLock(folder):
        ...     RunLock(folder).acquire()
        Traceback (most recent call last):
        ...
        kanvolution.experiments.files.RunFolderError: ... is in use by another run (pid ...); ...
        >>> is_locked(folder)
        False
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        path = prepare_folder(self.folder) / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError:
            raise RunFolderError(f"cannot write in {self.folder}: permission denied") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderError(
                f"{self.folder} is in use by another run (pid {holder}); wait for it or choose another output folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def is_locked(folder: str | os.PathLike[str]) -> bool | None:
    """Whether a live process holds ``folder``'s :class:`RunLock`; ``None`` when the folder has no lock file.

    A folder written before run locks existed has no lock file, so nothing can be said from it.
    """
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the shared lock taken just now
    return False
