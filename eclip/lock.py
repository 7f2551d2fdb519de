"""One writer at a time: an exclusive lock on a training run folder, an embedding folder or an
explanation cache, held for the lifetime of the run that writes it.

The lock is `fcntl.flock` on a small file that records the holder's process id. The kernel
drops it when the process ends, however it ends (SIGKILL, power loss), so a lock file left
behind never blocks anyone: the next run simply takes it. Several processes of ONE run
(torchrun, accelerate launch) share their folder: only the main process takes the lock.
"""
from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from eclip.errors import EclipError

FOLDER_LOCK = ".eclip-lock"


class WriterLock:
    """`with WriterLock(lock_file, what):` (or acquire() / release()). `what` names the
    folder or file in the error a second writer gets."""

    def __init__(self, lock_file, what: str):
        self.path = Path(lock_file)
        self.what = what
        self._fd = None

    def acquire(self) -> "WriterLock":
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:   # BlockingIOError: another process holds it
            holder = _holder(fd)
            os.close(fd)
            raise EclipError(f"{self.what}: another eclip process ({holder}) is writing here; wait for it to "
                             f"finish or stop it, or choose another output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_folder(folder, what: str | None = None) -> WriterLock:
    """Take the writer lock of `folder` (created if needed); EclipError when another process holds it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise EclipError(f"{what or folder}: exists and is not a folder")
    return WriterLock(folder / FOLDER_LOCK, what or str(folder)).acquire()


def lock_file(path, what: str | None = None) -> WriterLock:
    """Take the writer lock of a single file, kept beside it as FILE.lock."""
    path = Path(path)
    return WriterLock(path.with_name(path.name + ".lock"), what or str(path)).acquire()


def _holder(fd: int) -> str:
    """'pid N' as the holder wrote it; it writes right after locking, so wait a moment for it."""
    for _ in range(50):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return f"pid {text}"
        time.sleep(0.01)
    return "pid unknown"
