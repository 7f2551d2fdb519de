"""torch datasets that skip bad images instead of stopping a run.

A worker that raises kills the whole DataLoader, so items carry their failure
(`error`) instead, the collate functions drop them, and the caller writes them to
a `SkipLog`. Everything here is top-level and picklable, so DataLoader
`num_workers > 0` works under fork and spawn alike.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from eclip.data.images import ImageError, load_image
from eclip.data.records import Record


def _load(index: int, path: str, preprocess, open_image=load_image) -> dict:
    try:
        return {"index": index, "image": preprocess(open_image(path))}
    except ImageError as e:
        return {"index": index, "error": e.reason}
    except Exception as e:   # a transform failing on one odd image must not end the epoch
        return {"index": index, "error": f"preprocess failed ({type(e).__name__}: {str(e)[:120]})"}


class ImageDataset(Dataset):
    """Images for embedding: item i is {index, image [3,H,W]} or {index, error}."""

    def __init__(self, paths, preprocess):
        self.paths = [str(p) for p in paths]
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        return _load(i, self.paths[i], self.preprocess)


class PairDataset(ImageDataset):
    """Image-text pairs for training: item i is {index, image} or {index, error}.

    The trainer looks captions and explanations up by index. With a picklable
    `tokenize` (e.g. open_clip.get_tokenizer(name), not a model's bound method),
    items also carry `caption_tokens` and `explanation_tokens` [77], tokenized in
    the workers.

    `cache_mb` > 0 keeps decoded images and tokens in memory, per process (each DataLoader
    worker its own), until that many MB are held: later epochs then skip reading, decoding and
    tokenizing what is kept; `preprocess` (with its random augmentations) runs on every item as
    before, so items are the same with and without it.
    """

    def __init__(self, records, preprocess, tokenize=None, cache_mb: float = 0):
        super().__init__([r.image for r in records], preprocess)
        self.tokenize = tokenize
        self.texts = [(r.caption, r.training_explanation()) for r in records] if tokenize else None
        self.cache_bytes, self.cached_bytes = int(cache_mb * 2**20), 0
        self.images, self.tokens = {}, {}      # index -> decoded RGB image; index -> tokens [2, L]

    def __getitem__(self, i: int) -> dict:
        item = _load(i, self.paths[i], self.preprocess, lambda path: self._image(i, path))
        if self.tokenize is not None and "image" in item:
            tokens = self._tokens(i)
            item["caption_tokens"], item["explanation_tokens"] = tokens[0], tokens[1]
        return item

    def _image(self, i: int, path: str):
        image = self.images.get(i)
        if image is None:
            image = load_image(path)
            self._keep(self.images, i, image, image.width * image.height * len(image.getbands()))
        return image

    def _tokens(self, i: int) -> torch.Tensor:
        tokens = self.tokens.get(i)
        if tokens is None:
            tokens = self.tokenize(list(self.texts[i]))
            self._keep(self.tokens, i, tokens, tokens.numel() * tokens.element_size())
        return tokens

    def _keep(self, cache: dict, i: int, value, size: int) -> None:
        if self.cached_bytes + size <= self.cache_bytes:
            cache[i] = value
            self.cached_bytes += size


def collate_images(batch: list[dict]) -> dict:
    """{indices LongTensor [B], images FloatTensor [B,3,H,W], skipped [(index, reason)]}.

    B counts only the good items; when every item failed, indices is empty and
    images has shape [0].
    """
    good = [b for b in batch if "error" not in b]
    out = {
        "indices": torch.tensor([b["index"] for b in good], dtype=torch.long),
        "images": torch.stack([torch.as_tensor(b["image"]) for b in good]) if good else torch.empty(0),
        "skipped": [(b["index"], b["error"]) for b in batch if "error" in b],
    }
    for key in ("caption_tokens", "explanation_tokens"):
        if good and key in good[0]:
            out[key] = torch.stack([b[key] for b in good])
    return out


collate_pairs = collate_images   # same shape; pairs add the token tensors when present


class SkipLog:
    """Append-only JSONL of skipped items, {"id", "image", "reason"} per line.

    Each line is flushed as it is written, so a run that dies still leaves an exact
    list of what it could not read (train: skipped.jsonl, embed: errors.jsonl).
    `count` is the number of lines this SkipLog wrote.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        self.count = 0

    def write(self, id, image, reason: str) -> None:
        line = json.dumps({"id": None if id is None else str(id), "image": str(image), "reason": reason},
                          ensure_ascii=False)
        self._file.write(line + "\n")
        self._file.flush()
        self.count += 1

    def write_skipped(self, skipped, records) -> None:
        """Log a collate's `skipped` list; `records` (Records, or image paths) is what the
        dataset was built from."""
        for index, reason in skipped:
            item = records[index]
            if isinstance(item, Record):
                self.write(item.id, item.image, reason)
            else:
                self.write(None, item, reason)

    def close(self) -> None:
        if not self._file.closed:
            os.fsync(self._file.fileno())
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class HashedImages(ImageDataset):
    """ImageDataset whose good items also carry the sha256 of the file's bytes (eclip embed's
    images.parquet)."""

    def __getitem__(self, i: int) -> dict:
        from eclip.data.members import image_sha256
        item = super().__getitem__(i)
        if "error" not in item:
            try:
                item["sha256"] = image_sha256(self.paths[i])
            except OSError as e:   # vanished between decoding and hashing
                item = {"index": i, "error": f"unreadable ({type(e).__name__})"}
        return item


def collate_hashed(batch: list[dict]) -> dict:
    out = collate_images(batch)
    out["sha256"] = [b["sha256"] for b in batch if "error" not in b]
    return out
