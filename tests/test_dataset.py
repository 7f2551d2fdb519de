"""A bad image in the middle of an epoch is skipped and reported; everything else arrives."""
import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from eclip.data.dataset import ImageDataset, PairDataset, SkipLog, collate_images, collate_pairs
from eclip.data.records import Record


def to_tensor(im):
    """A stand-in for CLIP's preprocess (top-level, so workers can unpickle it)."""
    a = np.asarray(im.resize((32, 32)), dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1)


def fake_tokenize(texts):
    return torch.tensor([[len(t), 0] for t in texts], dtype=torch.long)


@pytest.fixture
def records(tmp_path, real_images):
    """Five pairs; the third image is a JPEG cut in half (a download killed half-way)."""
    names = ["astronaut", "rocket", "coffee", "chelsea", "astronaut"]
    out = []
    for i, name in enumerate(names):
        path = tmp_path / f"{i}.jpg"
        data = real_images[name].read_bytes()
        path.write_bytes(data[: len(data) // 2] if i == 2 else data)
        out.append(Record(f"r{i}", str(path), f"caption {i}", explanation="why" if i == 0 else None))
    return out


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_corrupt_image_mid_epoch_is_skipped_and_reported(records, workers, tmp_path):
    loader = DataLoader(PairDataset(records, to_tensor), batch_size=2, num_workers=workers,
                        collate_fn=collate_pairs)
    seen, images = [], []
    with SkipLog(tmp_path / "run" / "skipped.jsonl") as log:
        for batch in loader:
            assert batch["images"].shape[1:] == (3, 32, 32)
            assert len(batch["images"]) == len(batch["indices"])
            seen += batch["indices"].tolist()
            images.append(batch["images"])
            log.write_skipped(batch["skipped"], records)
    assert seen == [0, 1, 3, 4]
    assert log.count == 1
    lines = [json.loads(x) for x in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert lines == [{"id": "r2", "image": records[2].image, "reason": "truncated"}]
    images = torch.cat(images)
    assert torch.allclose(images[0], images[3])           # same astronaut photo, same tensor
    assert not torch.allclose(images[0], images[1])


def test_pair_dataset_tokenizes_in_workers(records):
    batch = collate_pairs([PairDataset(records, to_tensor, tokenize=fake_tokenize)[i] for i in (0, 1, 2)])
    assert batch["indices"].tolist() == [0, 1]
    assert batch["caption_tokens"][:, 0].tolist() == [len("caption 0"), len("caption 1")]
    assert batch["explanation_tokens"][:, 0].tolist() == [len("why"), len("caption 1")]   # caption fallback


def test_whole_batch_failing_gives_empty_batch(tmp_path):
    ds = ImageDataset([tmp_path / "gone.jpg", tmp_path / "also.jpg"], to_tensor)
    batch = collate_images([ds[0], ds[1]])
    assert batch["indices"].numel() == 0 and batch["images"].numel() == 0
    assert batch["skipped"] == [(0, "missing"), (1, "missing")]


def test_failing_preprocess_does_not_escape(real_images):
    def broken(im):
        raise RuntimeError("bad shape")
    item = ImageDataset([real_images["coffee"]], broken)[0]
    assert item == {"index": 0, "error": "preprocess failed (RuntimeError: bad shape)"}


def test_skip_log_is_flushed_per_line_and_appends(tmp_path):
    path = tmp_path / "errors.jsonl"
    log = SkipLog(path)
    log.write("a", "/x/a.jpg", "not an image")
    assert json.loads(path.read_text()) == {"id": "a", "image": "/x/a.jpg", "reason": "not an image"}
    log.write_skipped([(0, "missing")], ["/x/b.jpg"])
    log.close()
    with SkipLog(path) as again:
        again.write(None, "/x/c.jpg", "truncated")
    assert len(path.read_text().splitlines()) == 3 and (log.count, again.count) == (2, 1)


def test_datasets_and_collate_pickle_for_spawned_workers(records):
    """Under spawn/forkserver (macOS, Python 3.14's Linux default) workers get pickled copies."""
    import pickle
    ds = pickle.loads(pickle.dumps(PairDataset(records, to_tensor, tokenize=fake_tokenize)))
    collate = pickle.loads(pickle.dumps(collate_pairs))
    assert collate([ds[1]])["indices"].tolist() == [1]
