"""Retrieval metrics on hand-built similarity matrices with known answers, the reference
definitions, the tie rule, and chunked == unchunked."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eclip.metrics import (median_rank, recall_summary, retrieval_ranks, rsum, similarity_ranks)


def brute_force_ranks(sim, pairs):
    """Rank by the definition: 1 + negatives scoring >= the best positive (pessimistic ties)."""
    pos = torch.zeros(sim.shape, dtype=torch.bool)
    pos[pairs[:, 0], pairs[:, 1]] = True
    masked = torch.where(pos, sim, torch.tensor(-torch.inf))
    t2i = 1 + ((sim >= masked.max(1).values[:, None]) & ~pos).sum(1)
    i2t = 1 + ((sim >= masked.max(0).values[None, :]) & ~pos).sum(0)
    return t2i, i2t


def reference_recall(sims, positives_of):
    """The reference evaluation (ETE util.t2i_recall_GoodNews), 0-based ranks from argsort."""
    ranks = np.zeros(sims.shape[0])
    for q in range(sims.shape[0]):
        inds = np.argsort(sims[q])[::-1]
        ranks[q] = min(np.where(inds == p)[0][0] for p in positives_of[q])
    r = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    return r + [np.floor(np.median(ranks)) + 1, ranks.mean() + 1]


def test_one_caption_per_image_known_ranks():
    sim = torch.tensor([[0.9, 0.1, 0.2],
                        [0.8, 0.5, 0.3],     # caption 1: image 0 beats its image 1 -> rank 2
                        [0.1, 0.7, 0.6]])    # caption 2: image 1 beats its image 2 -> rank 2
    ranks = similarity_ranks(sim, [0, 1, 2])
    assert ranks.text_to_image.tolist() == [1, 2, 2]
    assert ranks.image_to_text.tolist() == [1, 2, 1]    # image 1: caption 2 (0.7) beats caption 1 (0.5)
    t2i = recall_summary(ranks.text_to_image)
    assert t2i == pytest.approx({"R@1": 100 / 3, "R@5": 100.0, "R@10": 100.0, "median_rank": 2,
                                 "mean_rank": 5 / 3})
    assert recall_summary(ranks.image_to_text, (1, 2))["R@1"] == pytest.approx(200 / 3)
    assert rsum(ranks) == pytest.approx(100 / 3 + 200 + 200 / 3 + 200)


def test_ties_rank_the_positive_after_tied_negatives():
    sim = torch.tensor([[0.5, 0.5, 0.5],     # all tied: worst rank, 3
                        [0.2, 0.5, 0.5],     # tied with one negative: 2
                        [0.1, 0.1, 0.6]])    # clear win: 1
    assert similarity_ranks(sim, [0, 1, 2]).text_to_image.tolist() == [3, 2, 1]
    # a model that scores every pair the same gets the worst rank everywhere, not R@1 = 100
    flat = similarity_ranks(torch.zeros(4, 4), [0, 1, 2, 3])
    assert flat.text_to_image.tolist() == [4] * 4 and flat.image_to_text.tolist() == [4] * 4
    assert recall_summary(flat.text_to_image)["R@1"] == 0.0


def test_scores_within_tolerance_are_ties_and_beyond_it_are_not():
    row = torch.tensor([0.5, 0.5 + 1e-7, 0.5 - 1e-7, 0.5 - 1e-3])   # caption 0's positive: image 0
    sim = row.expand(4, 4).clone()
    # 0.5 +- 1e-7 are float rounding away from 0.5: ties, ranked before the positive; 0.499 is below
    assert similarity_ranks(sim, [0, 1, 2, 3]).text_to_image[0].item() == 3
    # with no tolerance only the strictly higher score beats it
    assert similarity_ranks(sim, [0, 1, 2, 3], tie_tol=0.0).text_to_image[0].item() == 2


def test_several_positives_hit_when_any_is_in_top_k():
    # captions 0, 1 show image 0; captions 2, 3 show image 1
    sim = torch.tensor([[0.2, 0.9],
                        [0.6, 0.1],
                        [0.7, 0.8],
                        [0.1, 0.3]])
    ranks = similarity_ranks(sim, [0, 0, 1, 1])
    assert ranks.text_to_image.tolist() == [2, 1, 1, 1]
    # image 0: best positive is caption 1 (0.6); only caption 2 (0.7) is a negative above it;
    # caption 0, its other positive, is never counted against it
    # image 1: best positive is caption 2 (0.8); caption 0 (0.9) is above it
    assert ranks.image_to_text.tolist() == [2, 2]
    # a caption with two positive images (explicit pairs): its best one counts
    pairs = torch.tensor([[0, 0], [0, 1], [1, 0], [2, 1], [3, 1]])
    assert similarity_ranks(sim, pairs).text_to_image.tolist() == [1, 1, 1, 1]


def test_matches_the_reference_definitions_without_ties():
    g = torch.Generator().manual_seed(0)
    n_t, n_i = 40, 25
    image_of = torch.cat([torch.arange(n_i), torch.randint(0, n_i, (n_t - n_i,), generator=g)])
    sim = torch.rand(n_t, n_i, generator=g, dtype=torch.float64).float()
    ranks = similarity_ranks(sim, image_of, tie_tol=0.0)
    ref_t2i = reference_recall(sim.numpy(), [[int(i)] for i in image_of])
    ref_i2t = reference_recall(sim.T.numpy(), [[t for t in range(n_t) if image_of[t] == i] for i in range(n_i)])
    for ours, ref in ((ranks.text_to_image, ref_t2i), (ranks.image_to_text, ref_i2t)):
        s = recall_summary(ours)
        assert [s["R@1"], s["R@5"], s["R@10"], s["median_rank"], s["mean_rank"]] == pytest.approx(ref)


def test_median_rank_is_the_floor_of_numpy_median():
    for ranks in ([1, 4], [1, 2, 3, 10], [7], [2, 2, 9], [1, 6]):
        ref = np.floor(np.median(np.array(ranks) - 1)) + 1
        assert median_rank(torch.tensor(ranks)) == ref


def test_recalls_are_percentages():
    s = recall_summary(torch.tensor([1, 1, 3, 20]), (1, 5))
    assert s["R@1"] == 50.0 and s["R@5"] == 75.0 and s["mean_rank"] == 6.25


def _quantised_features(n, d, g):
    """Features on a coarse grid: many exactly equal scores, to exercise ties across chunks."""
    return (torch.randint(-2, 3, (n, d), generator=g).float()) / 4


@pytest.mark.parametrize("n_t,n_i,d", [(37, 23, 5), (300, 2100, 4)])   # 2nd: > 255 rows and > 2040 columns
def test_chunked_equals_unchunked_and_the_definition(n_t, n_i, d):
    g = torch.Generator().manual_seed(n_t)
    txt, img = _quantised_features(n_t, d, g), _quantised_features(n_i, d, g)
    image_of = torch.cat([torch.arange(min(n_t, n_i)), torch.randint(0, n_i, (max(0, n_t - n_i),), generator=g)])
    pairs = torch.stack([torch.arange(n_t), image_of[:n_t]], 1)
    if n_i > n_t:   # every image needs a caption: give the rest to caption 0
        pairs = torch.cat([pairs, torch.stack([torch.zeros(n_i - n_t, dtype=torch.long),
                                               torch.arange(n_t, n_i)], 1)])
    sim = txt @ img.T
    want_t2i, want_i2t = brute_force_ranks(sim, pairs)
    whole = similarity_ranks(sim, pairs, chunk_size=n_t, top_k=5, tie_tol=0.0)
    assert torch.equal(whole.text_to_image, want_t2i) and torch.equal(whole.image_to_text, want_i2t)
    for chunk in (1, 7, 256):
        for ranks in (similarity_ranks(sim, pairs, chunk_size=chunk, top_k=5, tie_tol=0.0),
                      retrieval_ranks(txt, img, pairs, chunk_size=chunk, top_k=5, tie_tol=0.0)):
            assert torch.equal(ranks.text_to_image, want_t2i)
            assert torch.equal(ranks.image_to_text, want_i2t)
            assert torch.equal(ranks.text_top[1], whole.text_top[1])      # same top-k scores
            assert torch.equal(ranks.image_top[1], whole.image_top[1])
            assert torch.equal(sim.gather(1, ranks.text_top[0]), ranks.text_top[1])
            assert torch.equal(sim.T.gather(1, ranks.image_top[0]), ranks.image_top[1])


def test_exact_duplicate_items_tie_the_same_way_at_every_chunk_size():
    """Two identical images: each caption's positive ties with the copy and ranks after it,
    even though a matrix multiply may round the two scores differently from the positive alone."""
    g = torch.Generator().manual_seed(3)
    txt = F.normalize(torch.randn(64, 512, generator=g), dim=1)
    img = F.normalize(txt + 0.02 * torch.randn(64, 512, generator=g), dim=1)   # cosines ~0.9
    img = torch.cat([img, img])                      # image i and image 64 + i are the same
    image_of = torch.arange(64)
    pairs = torch.cat([torch.stack([image_of, image_of], 1),
                       torch.stack([torch.zeros(64, dtype=torch.long), torch.arange(64, 128)], 1)])
    for chunk in (1, 5, 64):
        ranks = retrieval_ranks(txt, img, pairs, chunk_size=chunk)
        # caption 0 has both copies of image 0 as positives; every other caption's copy is a negative
        assert ranks.text_to_image[0].item() == 1
        assert (ranks.text_to_image[1:] == 2).all(), ranks.text_to_image


def test_every_query_needs_a_positive():
    with pytest.raises(ValueError, match="image"):
        similarity_ranks(torch.rand(3, 3), [0, 1, 1])      # image 2 has no caption
    with pytest.raises(ValueError):
        similarity_ranks(torch.rand(3, 3), [0, 1, 5])      # out of range
