"""Features kept on disk and reused: one safetensors file per (model, dataset split, what was
embedded), stamped with what made it, so a second evaluation of the same cell embeds nothing.

    tensors = cached_features(path, stamp, compute)   # compute() -> {name: tensor}, called on a miss

The stamp (model identity, dataset, split, the records' ids and image paths, ...) is stored in the
file's header; a file whose stamp differs is recomputed and replaced, never used. Writes are atomic.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable


def records_digest(records) -> str:
    """sha256 of the records' ids, image paths, captions and labels, in order: what a cell embedded."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.id, r.image, r.caption, r.label], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def cached_features(path, stamp: dict, compute: Callable[[], dict]) -> dict:
    """{name: tensor} from `path` when its stamp equals `stamp`, else compute(), saved there."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from eclip.atomic import atomic_path
    path = Path(path)
    want = json.dumps(stamp, sort_keys=True, default=str)
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("stamp") == want:
                    return {k: f.get_tensor(k) for k in f.keys()}
        except Exception:           # a damaged cache file is recomputed, not trusted
            pass
    tensors = {k: v.detach().cpu().contiguous() for k, v in compute().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"stamp": want})
    return tensors
