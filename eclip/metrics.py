"""Image-text retrieval metrics, pure torch: ranks, Recall@K, median / mean rank, rsum.

Definitions follow the reference evaluation (wangyxxjtu/ETE `util.t2i_recall`), written
with ranks that start at 1:

- The rank of a query is the position of its *first* positive in the gallery sorted by
  score, best first. A query with several positives (an image with several captions, a
  caption whose photo appears more than once) is a hit at K when any positive is in the
  top K, so its rank is that of its best-scoring positive.
- Recall@K = 100 * fraction of queries with rank <= K (a percentage, 0 to 100).
- median_rank = floor(median of the ranks) (numpy's median: the mean of the two middle
  ranks when the count is even), which is the reference's `floor(median(rank0)) + 1`.
- mean_rank = mean of the ranks.
- rsum = R@1 + R@5 + R@10 of both directions.

Ties are broken pessimistically: a negative whose score equals the best positive's counts
as ranked before it, so rank = 1 + number of negatives scoring >= the best positive. A
model that gives every pair the same score therefore gets the worst rank, never the best
(the reference's argsort leaves ties to the sort order). Scores within `tie_tol`
(default 1e-6) of the best positive count as equal: a cosine similarity computed by a
matrix multiply and the same one computed alone can differ in the last float32 bits, and
an exact duplicate must not win or lose a tie by rounding.

Scale: the similarity matrix is never held whole. Rows (captions) are scored in chunks
against all images; each chunk is compared once against the captions' best-positive
scores (text->image ranks) and once against the images' (image->text ranks), so both
directions cost one matrix multiply plus two comparison counts, and memory stays at a
few chunk-sized buffers. The best-positive scores come first, from the positive pairs
alone (in float64), which is what lets a rank be a count instead of a sort.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

TIE_TOLERANCE = 1e-6
CHUNK_BYTES = 256 << 20          # working memory per chunk: scores + two comparison masks
_LANES = 255                     # bytes of an int64 word can each count to 255 without carrying


@dataclass
class RetrievalRanks:
    """1-based rank of every query's first positive, both directions (int64 tensors)."""
    text_to_image: torch.Tensor                    # [n_texts]
    image_to_text: torch.Tensor                    # [n_images]
    text_top: Optional[tuple] = None               # (image indices [n_texts, k], scores), best first
    image_top: Optional[tuple] = None              # (text indices [n_images, k], scores), best first


def positive_pairs(positives, n_texts: int, n_images: int) -> torch.Tensor:
    """Ground truth as (text index, image index) pairs [P, 2], sorted by text.

    `positives` is either the image index of every caption ([n_texts], the usual case: one
    image per caption, any number of captions per image) or explicit pairs [P, 2].
    """
    p = torch.as_tensor(positives, dtype=torch.long).cpu()
    if p.dim() == 1:
        if p.numel() != n_texts:
            raise ValueError(f"positives: {p.numel()} image indices for {n_texts} texts")
        p = torch.stack([torch.arange(n_texts), p], dim=1)
    if p.dim() != 2 or p.shape[1] != 2:
        raise ValueError("positives: expected image indices [n_texts] or (text, image) pairs [P, 2]")
    if p.numel() and (p.min() < 0 or p[:, 0].max() >= n_texts or p[:, 1].max() >= n_images):
        raise ValueError("positives: an index is out of range")
    for col, n, what in ((0, n_texts, "text"), (1, n_images, "image")):
        missing = n - torch.unique(p[:, col]).numel()
        if missing:
            raise ValueError(f"positives: {missing} {what}(s) have no positive; every query needs one")
    p = torch.unique(p, dim=0)           # sorted by text, then image; duplicates dropped
    return p


def retrieval_ranks(text_features: torch.Tensor, image_features: torch.Tensor, positives, *,
                    chunk_size: int | None = None, top_k: int = 0, tie_tol: float = TIE_TOLERANCE,
                    on_chunk: Callable[[int], None] | None = None) -> RetrievalRanks:
    """Ranks from features: similarity = text_features @ image_features.T, computed in chunks.

    text_features [n_texts, D], image_features [n_images, D] (L2-normalised for cosine).
    `positives`: see `positive_pairs`. `top_k` > 0 also returns each query's top-k gallery
    items (for error analysis). `on_chunk(rows)` is called after each chunk of captions.
    """
    txt = _float(text_features)
    img = _float(image_features.to(txt.device))
    if txt.shape[1] != img.shape[1]:
        raise ValueError(f"feature widths differ: texts {txt.shape[1]}, images {img.shape[1]}")

    def pair_scores(t, i):                       # float64: the reference value ties are judged by
        out = torch.empty(t.numel(), dtype=torch.float64, device=txt.device)
        for s in range(0, t.numel(), 8192):
            a, b = txt[t[s:s + 8192]].double(), img[i[s:s + 8192]].double()
            out[s:s + 8192] = (a * b).sum(1)
        return out

    buffer = []                                  # one chunk of scores, reused (the first chunk is the largest)

    def score_rows(s, e):
        if not buffer:
            buffer.append(torch.empty(e - s, img.shape[0], device=txt.device))
        return torch.matmul(txt[s:e], img.T, out=buffer[0][:e - s])

    return _chunked_ranks(txt.shape[0], img.shape[0], score_rows, pair_scores, positives,
                          chunk_size, top_k, tie_tol, on_chunk, txt.device)


def similarity_ranks(similarity: torch.Tensor, positives, *, chunk_size: int | None = None, top_k: int = 0,
                     tie_tol: float = TIE_TOLERANCE) -> RetrievalRanks:
    """Ranks from a given similarity matrix [n_texts, n_images] (rows: captions, columns: images)."""
    sim = similarity if similarity.is_floating_point() else similarity.float()
    return _chunked_ranks(sim.shape[0], sim.shape[1], lambda s, e: _float(sim[s:e]),
                          lambda t, i: sim[t, i].double(), positives, chunk_size, top_k, tie_tol, None,
                          sim.device)


def _float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def _chunked_ranks(n_t, n_i, score_rows, pair_scores, positives, chunk_size, top_k, tie_tol, on_chunk, device):
    if n_t == 0 or n_i == 0:
        raise ValueError("retrieval needs at least one text and one image")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size {chunk_size}: must be at least 1")
    pairs = positive_pairs(positives, n_t, n_i).to(device)
    pt, pi = pairs[:, 0].contiguous(), pairs[:, 1].contiguous()

    # Best positive score of every query, then the lowest score that still ties with it.
    best = pair_scores(pt, pi)
    row_floor = torch.full((n_t,), -torch.inf, dtype=torch.float64, device=device)
    col_floor = torch.full((n_i,), -torch.inf, dtype=torch.float64, device=device)
    row_floor = row_floor.scatter_reduce(0, pt, best, "amax") - tie_tol
    col_floor = col_floor.scatter_reduce(0, pi, best, "amax") - tie_tol
    row_floor, col_floor = row_floor.float(), col_floor.float()

    # rank = 1 + #(all items >= floor) - #(positives >= floor): only negatives are counted.
    row_count = torch.zeros(n_t, dtype=torch.long, device=device)
    col_count = torch.zeros(n_i, dtype=torch.long, device=device)
    row_pos = torch.zeros(n_t, dtype=torch.long, device=device)
    col_pos = torch.zeros(n_i, dtype=torch.long, device=device)

    width = -(-n_i // 8) * 8                     # masks padded to whole int64 words (padding stays False)
    chunk = chunk_size if chunk_size else max(1, CHUNK_BYTES // (width * 6))
    chunk = min(chunk, n_t)
    row_mask = torch.zeros(chunk, width, dtype=torch.bool, device=device)
    col_mask = torch.zeros(chunk, width, dtype=torch.bool, device=device)
    k = min(top_k, n_i)
    text_top = (torch.empty(n_t, k, dtype=torch.long, device=device),
                torch.empty(n_t, k, device=device)) if k else None
    img_top_s = img_top_i = None
    k_t = min(top_k, n_t)

    bounds = torch.searchsorted(pt, torch.arange(0, n_t + chunk, chunk, device=device).clamp(max=n_t))
    for c, s in enumerate(range(0, n_t, chunk)):
        e = min(s + chunk, n_t)
        scores = score_rows(s, e)                                    # [r, n_i] float32
        r = e - s
        rm, cm = row_mask[:r], col_mask[:r]
        torch.ge(scores, row_floor[s:e, None], out=rm[:, :n_i])
        torch.ge(scores, col_floor[None, :], out=cm[:, :n_i])
        row_count[s:e] += _count_rows(rm)
        col_count += _count_columns(cm)[:n_i]

        a, b = bounds[c].item(), bounds[c + 1].item()                # this chunk's positive pairs
        t, i = pt[a:b], pi[a:b]
        v = scores[t - s, i]
        row_pos.index_add_(0, t, (v >= row_floor[t]).long())
        col_pos.index_add_(0, i, (v >= col_floor[i]).long())

        if k:
            top_s, top_i = scores.topk(k, dim=1)
            text_top[0][s:e], text_top[1][s:e] = top_i, top_s
        if k_t:
            cs, ci = scores.topk(min(k_t, r), dim=0)                 # [<=k, n_i]
            ci = ci + s
            if img_top_s is not None:
                cs, ci = torch.cat([img_top_s, cs]), torch.cat([img_top_i, ci])
                cs, order = cs.topk(min(k_t, cs.shape[0]), dim=0)
                ci = ci.gather(0, order)
            img_top_s, img_top_i = cs, ci
        if on_chunk:
            on_chunk(r)

    ranks = RetrievalRanks(text_to_image=1 + row_count - row_pos, image_to_text=1 + col_count - col_pos,
                           text_top=text_top)
    if k_t:
        ranks.image_top = (img_top_i.T.contiguous(), img_top_s.T.contiguous())
    return ranks


def _count_rows(mask: torch.Tensor) -> torch.Tensor:
    """Number of True per row of a bool mask [r, 8w].

    Summing bools in torch widens every element to int64 (several ns each); summing the
    mask as int64 words adds 8 bytes at once, each byte lane counting up to 255.
    """
    words = mask.view(torch.int64)                                   # [r, w]
    r, w = words.shape
    full = w // _LANES * _LANES
    parts = [words[:, :full].view(r, -1, _LANES).sum(-1)] if full else []
    if full < w:
        parts.append(words[:, full:].sum(-1, keepdim=True))
    packed = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # [r, blocks], lanes <= 255
    return packed.contiguous().view(torch.uint8).sum(1)


def _count_columns(mask: torch.Tensor) -> torch.Tensor:
    """Number of True per column of a bool mask [r, 8w] -> [8w] int64 (same byte-lane trick)."""
    words = mask.view(torch.int64)
    total = torch.zeros(mask.shape[1], dtype=torch.long, device=mask.device)
    for s in range(0, words.shape[0], _LANES):
        total += words[s:s + _LANES].sum(0).view(torch.uint8)
    return total


def median_rank(ranks: torch.Tensor) -> int:
    """floor(median), with the median of an even count the mean of the two middle ranks."""
    r = ranks.flatten().sort().values.double()
    n = r.numel()
    if n == 0:
        raise ValueError("no ranks")
    mid = r[n // 2] if n % 2 else (r[n // 2 - 1] + r[n // 2]) / 2
    return int(torch.floor(mid).item())


def recall_at(ranks: torch.Tensor, k: int) -> float:
    """Percentage of queries whose first positive is in the top k."""
    if ranks.numel() == 0:
        raise ValueError("no ranks")
    return 100.0 * (ranks <= k).double().mean().item()


def recall_summary(ranks: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """{"R@1": .., "R@5": .., "R@10": .., "median_rank": .., "mean_rank": ..} for one direction."""
    out = {f"R@{k}": recall_at(ranks, k) for k in ks}
    out["median_rank"] = median_rank(ranks)
    out["mean_rank"] = ranks.double().mean().item()
    return out


def rsum(ranks: RetrievalRanks) -> float:
    """R@1 + R@5 + R@10 of both directions (always at 1/5/10, whatever else is reported)."""
    return sum(recall_at(r, k) for r in (ranks.text_to_image, ranks.image_to_text) for k in (1, 5, 10))
