"""The model hub, offline-safe: is a file cached, can the hub be asked at all (a 3 s probe, or
HF_HUB_OFFLINE), and a guard that keeps huggingface_hub off the network for cached files."""
from __future__ import annotations

import contextlib
import os
import socket

HUB_HOST = "huggingface.co"


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return False
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def cached_hub_file(repo: str, filenames) -> str | None:
    from huggingface_hub import try_to_load_from_cache
    for name in filenames:
        path = try_to_load_from_cache(repo, name)
        if isinstance(path, str):
            return path
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
