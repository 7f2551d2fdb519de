"""Top-K search over L2-normalised vectors (inner product = cosine).

Which search, by gallery size (method="auto"):
- up to EXACT_MAX rows (50,000): one matrix product and an exact top-K (numpy);
- up to IVF_MIN rows (1,000,000): FAISS IndexFlatIP, still exact, multi-threaded and
  memory-lean (no [Q, N] score matrix);
- above IVF_MIN rows: FAISS IndexIVFFlat (approximate; nlist ~ 4 sqrt(N), nprobe = NPROBE).
  Training it takes a while, so the trained index is cached beside the vectors when the
  folder is writable (`index_path`).
Exact and flat search give the same top-1; IVF may miss a neighbour that falls outside the
probed lists.
"""
from __future__ import annotations

import os
from pathlib import Path

EXACT_MAX = 50_000
IVF_MIN = 1_000_000
NPROBE = 32
METHODS = ("auto", "exact", "flat", "ivf")


def choose_method(n: int, method: str = "auto") -> str:
    if method not in METHODS:
        raise ValueError(f"unknown search method {method!r} (one of {', '.join(METHODS)})")
    if method != "auto":
        return method
    return "exact" if n <= EXACT_MAX else "flat" if n <= IVF_MIN else "ivf"


def search(queries, gallery, k: int, method: str = "auto", index_path=None):
    """queries [Q, D], gallery [N, D] (float32 numpy, L2-normalised) -> (scores [Q, k'], indices [Q, k']).

    k' = min(k, N); rows best first. Ties are broken by the lower gallery index.
    """
    import numpy as np
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    n = gallery.shape[0]
    k = min(int(k), n)
    if k <= 0 or queries.shape[0] == 0:
        return np.zeros((queries.shape[0], 0), np.float32), np.zeros((queries.shape[0], 0), np.int64)
    method = choose_method(n, method)
    if method == "exact":
        return _exact(queries, gallery, k)
    index = _ivf_index(gallery, index_path) if method == "ivf" else _flat_index(gallery)
    scores, indices = index.search(queries, k)
    return scores, indices.astype(np.int64)


def _exact(queries, gallery, k):
    import numpy as np
    scores = queries @ gallery.T                                   # [Q, N]
    if k < scores.shape[1]:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]       # the k best, unordered
    else:
        part = np.tile(np.arange(scores.shape[1]), (scores.shape[0], 1))
    top = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -top), axis=1)                       # by score, then by index
    indices = np.take_along_axis(part, order, axis=1)
    return np.take_along_axis(scores, indices, axis=1), indices.astype(np.int64)


def _flat_index(gallery):
    import faiss
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    return index


def ivf_lists(n: int) -> int:
    return max(1, min(n // 39, int(4 * n ** 0.5)))   # FAISS wants >= 39 training points per list


def _ivf_index(gallery, index_path=None):
    """IndexIVFFlat over inner product, trained on (a sample of) the gallery; cached at index_path."""
    import faiss
    import numpy as np
    n, d = gallery.shape
    if index_path is not None and Path(index_path).is_file():
        try:
            index = faiss.read_index(str(index_path))
            if index.ntotal == n and index.d == d:
                index.nprobe = NPROBE
                return index
        except RuntimeError:   # a damaged cache is rebuilt
            pass
    nlist = ivf_lists(n)
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    sample = gallery
    if n > 256 * nlist:   # FAISS needs no more than ~256 points per list to train
        sample = gallery[np.random.default_rng(0).choice(n, 256 * nlist, replace=False)]
    index.train(sample)
    index.add(gallery)
    index.nprobe = NPROBE
    if index_path is not None:
        _save_index(index, Path(index_path))
    return index


def _save_index(index, path: Path) -> None:
    import faiss

    from eclip.atomic import atomic_path
    if not os.access(path.parent, os.W_OK):
        return
    try:
        with atomic_path(path) as tmp:
            faiss.write_index(index, str(tmp))
    except OSError:   # a cache we cannot write is only a slower next run
        pass
