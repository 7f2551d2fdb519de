"""Whole-or-nothing file writes: write a temporary file beside the target, fsync, rename."""
import contextlib
import errno
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path in the target's folder; on success it replaces `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def same_file(source, path) -> None:
    """`path` becomes a whole copy of `source`, atomically: a hard link to it where the filesystem
    allows (no bytes written; files written by atomic_path are replaced, never changed in place, so
    the link keeps this version), else a copy."""
    import shutil
    with atomic_path(path) as tmp:
        os.unlink(tmp)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NEARLY_FULL = 1 << 20   # bytes


def disk_full(exc: BaseException, path=None) -> bool:
    """True when `exc` (or what caused it) is a full disk or quota. With `path`, also when the write
    failed without saying why and the filesystem of `path` is (nearly) full: torch's zip writer
    reports a full disk as "[enforce fail at inline_container.cc] unexpected pos"."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in NO_SPACE:
            return True
        text = str(seen)
        if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    if path is not None:
        try:
            st = os.statvfs(path)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < NEARLY_FULL
    return False


def process_alive(pid: int) -> bool:
    """Is process `pid` running on this host? (A writer's temporary files outlive it when it is killed.)"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:    # another user's process
        return True
    return True
