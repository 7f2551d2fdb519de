"""The model hub, offline-safe: is a file cached, can the hub be asked at all (a 3 s probe, or
HF_HUB_OFFLINE), and a guard that keeps huggingface_hub off the network for cached files."""
from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

HUB_HOST = "huggingface.co"


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return False
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_cache_dir() -> Path:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def cached_hub_file(repo: str, filenames, revision: str = "main") -> str | None:
    """The cached snapshot file of `repo` at `revision`, as huggingface_hub's try_to_load_from_cache
    finds it (models--ORG--NAME/refs/REV -> snapshots/COMMIT/FILE), read without importing
    huggingface_hub (whose file_download imports httpx: ~1 s of a cold start)."""
    folder = hub_cache_dir() / ("models--" + repo.replace("/", "--"))
    ref = folder / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    for name in filenames:
        path = folder / "snapshots" / commit / name
        if path.is_file():
            return str(path)
    return None


def hub_file_available(repo: str, filenames) -> bool:
    """One of `filenames` of hub repo `repo` is in the local cache, or the hub can be asked."""
    return cached_hub_file(repo, filenames) is not None or hub_reachable()


@contextlib.contextmanager
def hub_offline_if_cached(cached: bool):
    """Files already cached: stop huggingface_hub from asking the network about them."""
    old = os.environ.get("HF_HUB_OFFLINE")
    if cached:
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if cached:
            if old is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = old
