"""`eclip train --data-cache-mb`: decoded images and tokens kept in memory per loading process,
bounded, and changing nothing: the same items, the same weights."""
import dataclasses
import json
import random
from types import SimpleNamespace

import pytest
import torch

import eclip.data.dataset as dataset_module
from eclip.config import AUGMENT
from eclip.data.dataset import PairDataset
from eclip.data.readers import read_dataset
from eclip.train.setup import training_transform

from train_helpers import build_flags, one_thread_run, same_last_weights, train_args


@pytest.fixture(scope="module")
def flags(tmp_path_factory):
    return build_flags(tmp_path_factory.mktemp("flags"))


def _augment():
    """The training transform --augment builds for a 64-pixel model: random crops and colour jitter."""
    model = SimpleNamespace(config=SimpleNamespace(preprocess={"size": 64}))
    return training_transform(model, AUGMENT)


class CountingTokenizer:
    def __init__(self):
        self.calls = 0

    def __call__(self, texts):
        self.calls += 1
        return torch.tensor([[len(t), sum(map(ord, t)) % 997] for t in texts])


def _epoch(ds, seed):
    torch.manual_seed(seed)
    random.seed(seed)        # open_clip's colour jitter draws from Python's generator
    return [ds[i] for i in range(len(ds))]


def test_cached_items_equal_uncached_and_later_epochs_read_no_file(flags, tmp_path, monkeypatch):
    records = read_dataset(str(flags / "set" / "train.jsonl"))
    plain = PairDataset(records, _augment(), CountingTokenizer())
    cached = PairDataset(records, _augment(), CountingTokenizer(), cache_mb=64)
    reads = []
    original = dataset_module.load_image
    monkeypatch.setattr(dataset_module, "load_image", lambda path: reads.append(path) or original(path))
    for seed in (0, 1):      # the first epoch fills the cache, the second reads from it
        for a, b in zip(_epoch(plain, seed), _epoch(cached, seed)):
            assert a.keys() == b.keys() == {"index", "image", "caption_tokens", "explanation_tokens"}
            assert all(torch.equal(a[k], b[k]) for k in ("image", "caption_tokens", "explanation_tokens"))
    n = len(records)
    assert len(reads) == 2 * n + n            # plain read every image twice, the cached dataset once
    assert plain.tokenize.calls == 2 * n and cached.tokenize.calls == n
    assert len(cached.images) == len(cached.tokens) == n and plain.cached_bytes == 0 and not plain.images
    assert cached.cached_bytes == sum(im.width * im.height * 3 for im in cached.images.values()) + n * 2 * 2 * 8


def test_the_cache_stops_at_its_budget_and_keeps_no_failure(flags, tmp_path):
    records = read_dataset(str(flags / "set" / "train.jsonl"))[:6]
    one = records[0].image
    from PIL import Image
    with Image.open(one) as im:
        size = im.width * im.height * 3 + 2 * 2 * 8
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a jpeg")
    records[5] = dataclasses.replace(records[5], image=str(broken))
    budget = 2.5 * size
    ds = PairDataset(records, _augment(), CountingTokenizer(), cache_mb=budget / 2**20)
    items = [ds[i] for i in range(6)]
    assert sorted(ds.images) == [0, 1] and ds.cached_bytes <= budget      # tokens, smaller, fill the rest
    assert "error" in items[5] and "error" in ds[5] and 5 not in ds.images | ds.tokens   # refused again, never kept
    assert all(torch.equal(ds[i]["caption_tokens"], items[i]["caption_tokens"]) for i in range(5))


def test_training_with_the_data_cache_gives_the_same_weights(flags, tmp_path):
    """Two epochs with one loading worker and --augment, with and without the cache (the worker keeps
    its cache across epochs: persistent workers)."""
    runs = {}
    for cache in ("0", "64"):
        runs[cache] = tmp_path / f"cache-{cache}"
        one_thread_run(train_args(flags, runs[cache], "--workers", "1", "--augment", "--data-cache-mb", cache))
    config = json.loads((runs["64"] / "config.json").read_text())
    assert config["data_cache_mb"] == 64
    assert same_last_weights(runs["0"], runs["64"])
