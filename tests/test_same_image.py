"""`eclip evaluate --same-image {bytes,path,none}`, each checked against an independent computation
on the same embeddings (the vectors an `eclip embed` store holds):

- none: the EntityCLIP reference's recall code (wangyxxjtu/ETE util.t2i_recall, called by its
  eval.py), written again here in numpy: record i's caption and image are each other's only
  positive, ranks are positions in a descending argsort;
- path: CLIP_benchmark's own `recall_at_k` (clip_benchmark.metrics.zeroshot_retrieval), with
  its convention: one gallery image per file, a hit when any positive is in the top K;
- bytes: the same, with files of identical contents as one gallery image.
"""
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from eclip.cli import app
from eclip.embedstore import evaluate_embeddings, open_store
from eclip.evaluate import evaluate_features

from train_helpers import build_flags


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def data(tmp_path_factory, checkpoint):
    """Two tables of real flags and their `eclip embed` stores (fp32):
    distinct.jsonl: 48 records, every image file and every caption different;
    shared.jsonl: 48 records on 12 image files, 4 captions each (a flag's first view);
    copies.jsonl: 8 records, the first 6 of distinct.jsonl and two more whose images are
    byte-identical copies of the first one's under other names."""
    folder = build_flags(tmp_path_factory.mktemp("same-image"))
    rows = [json.loads(x) for x in (folder / "set/train.jsonl").read_text().splitlines()]
    for r in rows:
        r["image"] = str(folder / "set" / r["image"])
    (folder / "distinct.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    first_view = {}
    for r in rows:
        first_view.setdefault(r["entities"][0]["text"], r["image"])
    shared = [{**r, "image": first_view[r["entities"][0]["text"]]} for r in rows]
    (folder / "shared.jsonl").write_text("".join(json.dumps(r) + "\n" for r in shared))
    copies = rows[:6] + [{**r, "image": str(shutil.copy(rows[0]["image"], folder / f"copy{i}.jpg"))}
                         for i, r in enumerate(rows[6:8])]
    (folder / "copies.jsonl").write_text("".join(json.dumps(r) + "\n" for r in copies))
    for name in ("distinct", "shared", "copies"):
        run("embed", "--checkpoint", checkpoint[0], "--dataset", folder / f"{name}.jsonl", "--output",
            folder / f"{name}-vectors", "--dtype", "fp32", "--workers", "0")
    return folder


def stored(folder):
    """(text vectors, image vectors, image paths), one row per record, in record order (the store
    holds each image file once; a record's caption row names its file)."""
    store = open_store(folder)
    images, texts = store.table("images").to_pydict(), store.table("texts").to_pydict()
    rows = [images["path"].index(path) for path in texts["image"]]
    return store.vectors("texts"), store.vectors("images")[rows], texts["image"]


def reference_recall(query, candidate):
    """ETE util.t2i_recall, again: cosine, argsort descending, rank = where record i's own item is;
    R@K = 100 * share of ranks < K, medr = floor(median) + 1, meanr = mean + 1."""
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    c = candidate / np.linalg.norm(candidate, axis=1, keepdims=True)
    sims = q @ c.T
    ranks = np.array([np.where(np.argsort(sims[i])[::-1] == i)[0][0] for i in range(len(q))])
    out = {f"R@{k}": 100.0 * np.sum(ranks < k) / len(ranks) for k in (1, 5, 10)}
    out.update(median_rank=np.floor(np.median(ranks)) + 1, mean_rank=ranks.mean() + 1)
    return out


def test_none_is_the_reference_protocol(data):
    texts, images, _ = stored(data / "distinct-vectors")
    ours = evaluate_embeddings(data / "distinct-vectors", same_image="none")
    assert ours["n_images"] == ours["n_texts"] == 48 and ours["same_image"] == "none"
    for direction, (query, candidate) in {"text_to_image": (texts, images),
                                          "image_to_text": (images, texts)}.items():
        ref = reference_recall(query, candidate)
        assert 0 < ref["R@10"] < 100                                   # a test that can tell them apart
        for key, value in ref.items():
            assert ours[direction][key] == pytest.approx(value, abs=1e-9), (direction, key)


def file_digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("name, mode, key, n_images", [("shared", "path", str, 12), ("copies", "bytes", file_digest, 6)])
def test_path_and_bytes_score_as_clip_benchmark_does(data, name, mode, key, n_images):
    """CLIP_benchmark groups captions under one gallery image per dataset item (a file); `bytes`
    is the same computation with files grouped by their contents."""
    from clip_benchmark.metrics.zeroshot_retrieval import recall_at_k
    texts, images, paths = stored(data / f"{name}-vectors")
    keys = [key(p) for p in paths]
    items = list(dict.fromkeys(keys))
    gallery = torch.from_numpy(images[[keys.index(k) for k in items]])
    scores = torch.from_numpy(texts) @ gallery.T                           # [texts, images]
    positive = torch.tensor([[k == item for item in items] for k in keys])
    ours = evaluate_embeddings(data / f"{name}-vectors", same_image=mode, recall_k=(1, 2, 5))
    assert ours["n_images"] == len(items) == n_images and ours["n_texts"] == len(paths)
    for k in (1, 2, 5):
        t2i = (recall_at_k(scores, positive, k) > 0).float().mean().item() * 100
        i2t = (recall_at_k(scores.T, positive.T, k) > 0).float().mean().item() * 100
        assert ours["text_to_image"][f"R@{k}"] == pytest.approx(t2i, abs=1e-4), (mode, k)
        assert ours["image_to_text"][f"R@{k}"] == pytest.approx(i2t, abs=1e-4), (mode, k)
    assert 0 < ours["text_to_image"]["R@1"] < 100


def test_bytes_merges_identical_files_path_merges_names_none_merges_nothing(data):
    n = {(name, mode): evaluate_embeddings(data / f"{name}-vectors", same_image=mode)["n_images"]
         for name in ("shared", "copies") for mode in ("bytes", "path", "none")}
    assert n == {("shared", "bytes"): 12, ("shared", "path"): 12, ("shared", "none"): 48,
                 ("copies", "bytes"): 6, ("copies", "path"): 8, ("copies", "none"): 8}


@pytest.mark.parametrize("mode", ["bytes", "path", "none"])
def test_evaluate_on_a_dataset_equals_evaluate_on_its_embeddings(data, checkpoint, mode):
    table = data / "copies.jsonl"
    report = json.loads(run("evaluate", "--dataset", table, "--checkpoint", checkpoint[0], "--device", "cpu",
                            "--same-image", mode, "--json").stdout)
    stored_report = json.loads(run("evaluate", "--embeddings", data / "copies-vectors", "--same-image", mode,
                                   "--json").stdout)
    assert report["same_image"] == stored_report["same_image"] == mode
    assert report["n_images"] == stored_report["n_images"]
    for direction in ("text_to_image", "image_to_text"):
        for key, value in stored_report[direction].items():
            assert report[direction][key] == pytest.approx(value, abs=1e-6), (mode, direction, key)


def test_same_image_is_checked():
    result = CliRunner().invoke(app, ["evaluate", "--embeddings", "nowhere", "--same-image", "pixels"])
    assert result.exit_code == 2 and "--same-image pixels: one of bytes, path, none" in result.output


def test_identical_caption_texts_never_reach_image_to_text_rank_1():
    """Records 0 and 1 have the same caption text and different images; record 2 is unlike both.
    Each caption is a negative of the other record's image that ties with its positive, and ties
    rank the positive last: neither image reaches rank 1, and of the two captions (one ranking
    for both) only one can."""
    a, b = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]), dim=-1)
    texts = torch.stack([a, a, b])
    images = torch.nn.functional.normalize(torch.stack([a + torch.tensor([0, 0.1, 0]),
                                                        a + torch.tensor([0, 0.2, 0]), b]), dim=-1)
    report = evaluate_features(texts, images, [0, 1, 2], recall_k=(1,))
    assert report["image_to_text"]["R@1"] == pytest.approx(100 / 3)    # only image 2
    assert report["text_to_image"]["R@1"] == pytest.approx(200 / 3)    # caption 0 (image 0 is closer) and 2
