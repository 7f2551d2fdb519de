"""Top-K gallery search: every method agrees with brute force on small data."""
import numpy as np
import pytest

from eclip.gallery import EXACT_MAX, IVF_MIN, choose_method, ivf_lists, search


def unit(rng, n, d=32):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(queries, gallery, k):
    scores = queries @ gallery.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("method", ["exact", "flat"])
def test_exact_methods_equal_brute_force_top_k(method):
    rng = np.random.default_rng(0)
    gallery, queries = unit(rng, 500), unit(rng, 20)
    scores, indices = search(queries, gallery, 10, method)
    want_scores, want_indices = brute_force(queries, gallery, 10)
    assert indices.shape == (20, 10)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)


def test_ivf_top1_equals_brute_force_on_small_data(tmp_path):
    rng = np.random.default_rng(1)
    gallery, queries = unit(rng, 2000), unit(rng, 30)
    cache = tmp_path / "images-x.ivf.faiss"
    scores, indices = search(queries, gallery, 5, "ivf", index_path=cache)
    _, want = brute_force(queries, gallery, 5)
    np.testing.assert_array_equal(indices[:, 0], want[:, 0])
    assert cache.is_file()                       # the trained index is kept for the next search
    again = search(queries, gallery, 5, "ivf", index_path=cache)[1]
    np.testing.assert_array_equal(again, indices)


def test_gallery_queries_find_their_own_rows():
    rng = np.random.default_rng(2)
    gallery = unit(rng, 300)
    for method in ("exact", "flat", "ivf"):
        _, indices = search(gallery[:50], gallery, 1, method)
        np.testing.assert_array_equal(indices[:, 0], np.arange(50)), method


def test_k_larger_than_gallery_is_clamped_and_ties_break_by_index():
    gallery = np.array([[1, 0], [1, 0], [0, 1]], np.float32)
    scores, indices = search(np.array([[1, 0]], np.float32), gallery, 10, "exact")
    assert indices.tolist() == [[0, 1, 2]]
    assert scores[0, :2].tolist() == [1.0, 1.0]


def test_auto_method_by_gallery_size():
    assert choose_method(10) == "exact"
    assert choose_method(EXACT_MAX) == "exact"
    assert choose_method(EXACT_MAX + 1) == "flat"
    assert choose_method(IVF_MIN + 1) == "ivf"
    assert choose_method(10, "flat") == "flat"
    with pytest.raises(ValueError):
        choose_method(10, "hnsw")
    assert 1 <= ivf_lists(100) and ivf_lists(10_000_000) == int(4 * 10_000_000 ** 0.5)
