"""One writer at a time: an exclusive lock on a training run folder, an embedding folder or an
explanation cache, held for the lifetime of the run that writes it.

The lock is a POSIX record lock (`fcntl.lockf`) on a small file that records the holder's
process id. The kernel drops it when the process ends, however it ends (SIGKILL, power loss), so
a lock file left behind never blocks anyone: the next run simply takes it. A POSIX lock belongs to
the process, not to the open file: the processes it forks (DataLoader workers, which outlive a
killed parent by up to several seconds) never hold it, so the recorded process is always the
holder and a dead one never blocks (`flock` locks are shared with forked children). Within one
process a second lock on the same file is refused too (POSIX locks would let it through), and the
lock file is opened only here: closing any descriptor of it would drop the process's lock.
Several processes of ONE run (torchrun, accelerate launch) share their folder: only the main
process takes the lock.
"""
from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

from eclip.errors import EclipError

FOLDER_LOCK = ".eclip-lock"
_HELD: set = set()            # (device, inode) of the lock files this process holds
_HELD_GUARD = threading.Lock()


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
        with _HELD_GUARD:
            st = os.stat(self.path) if self.path.exists() else None
            if st is not None and (st.st_dev, st.st_ino) in _HELD:   # this process holds it already
                raise self._busy(f"pid {os.getpid()}")
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:   # another process holds it
                holder = _holder(fd)
                os.close(fd)
                raise self._busy(holder) from None
            st = os.fstat(fd)
            self._key = (st.st_dev, st.st_ino)
            _HELD.add(self._key)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def _busy(self, holder: str) -> EclipError:
        return EclipError(f"{self.what}: another eclip process ({holder}) is writing here; wait for it to "
                          f"finish or stop it, or choose another output")

    def release(self) -> None:
        if self._fd is not None:
            with _HELD_GUARD:
                os.close(self._fd)          # drops the POSIX lock
                _HELD.discard(self._key)
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
