"""The explanation cache: one JSON object per line, appended as explanations arrive.

Line format (read by `eclip train --explanations`):
    {"id": str|null, "caption": str, "explanation": str|null, "model": str,
     "prompt_sha256": str, "error": str|null[, "key": str]}

A line without "key" is caption-wide: it serves every record with that caption (tables,
benchmarks, --texts, and every cache older eclip wrote). A line with "key" belongs to one
sample: `explain` over shards, parquet and files folders writes one per sample, "key" being the
record id (the shard's __key__ or --id-key), so two samples with one caption can carry two
explanations. Older eclip ignores "key" and reads such a line by its caption.

The cache key is (caption, model, prompt_sha256), plus the "key" when there is one. A line
with an error or no explanation does not count as cached: the next run tries it again.
A process killed mid-write can leave a last line without its newline; readers
ignore it and `CacheWriter` cuts it off before appending, so the file stays valid
whatever moment the kill came at. Lines are appended, never rewritten, so a
cache grows by one line per attempt; the last good line for a key wins.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Optional

from eclip.errors import EclipError

FIELDS = ("id", "caption", "explanation", "model", "prompt_sha256", "error")


def make_entry(id, caption: str, explanation: Optional[str], model: str, prompt_sha256: str,
               error: Optional[str] = None, key: Optional[str] = None) -> dict:
    entry = {"id": None if id is None else str(id), "caption": caption, "explanation": explanation,
             "model": model, "prompt_sha256": prompt_sha256, "error": error}
    if key is not None:        # caption-wide lines stay as older eclip wrote them
        entry["key"] = str(key)
    return entry


def is_ok(entry: dict) -> bool:
    """True when the line holds a usable explanation."""
    return entry.get("error") is None and isinstance(entry.get("explanation"), str) and bool(entry["explanation"])


def sample_key(entry: dict) -> Optional[str]:
    """The sample a line belongs to, or None for a caption-wide line."""
    key = entry.get("key")
    return key if isinstance(key, str) else None


def key_of(entry: dict) -> tuple:
    """(caption, model, prompt_sha256) for a caption-wide line, with the sample key after them for a keyed one."""
    key = sample_key(entry)
    return (entry["caption"], entry["model"], entry["prompt_sha256"]) + (() if key is None else (key,))


def iter_entries(path) -> Iterator[dict]:
    """Every complete line of the cache, in file order. A missing file yields nothing;
    a last line without its newline (a killed run) is skipped."""
    path = Path(path)
    if not path.exists():
        return
    if path.is_dir():
        raise EclipError(f"{path}: explanation cache is a folder, not a JSONL file")
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    # the element after the last newline is b"" for a clean file, or a partial line
    for number, raw in enumerate(lines[:-1], start=1):
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise EclipError(f"{path}: line {number} is not valid JSON "
                             "(not an eclip explanation cache, or edited by hand)") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("caption"), str) \
                or not isinstance(entry.get("model"), str) or not isinstance(entry.get("prompt_sha256"), str):
            raise EclipError(f"{path}: line {number} lacks caption/model/prompt_sha256 "
                             "(not an eclip explanation cache)")
        yield entry


class Explanations:
    """What training looks up in a cache, in this order: the sample's own line (its record id and
    caption), the last caption-wide line for its caption, the last line for its caption whatever its
    key. So one cache still serves every dataset that shares captions, and a cache older eclip wrote
    serves shards as it did."""

    def __init__(self):
        self.by_caption, self.wide, self.by_key = {}, {}, {}    # any line / lines without a key / keyed

    def add(self, entry: dict) -> None:
        self.by_caption[entry["caption"]] = entry["explanation"]
        key = sample_key(entry)
        if key is None:
            self.wide[entry["caption"]] = entry["explanation"]
        else:
            self.by_key[(key, entry["caption"])] = entry["explanation"]

    def lookup(self, id, caption: str, default: Optional[str] = None) -> Optional[str]:
        for found in (self.by_key.get((str(id), caption)), self.wide.get(caption), self.by_caption.get(caption)):
            if found is not None:
                return found
        return default

    def __len__(self) -> int:
        return len(self.by_caption)


def read_explanations_cache(path, model: Optional[str] = None, prompt_sha256: Optional[str] = None) -> Explanations:
    """Every usable line (optionally only one model / prompt), for lookup by sample and caption;
    failed lines count as missing."""
    path = Path(path)
    if not path.exists():
        raise EclipError(f"{path}: explanation cache not found (write it with `eclip explain --output {path}`)")
    found = Explanations()
    for entry in iter_entries(path):
        if not is_ok(entry):
            continue
        if model is not None and entry["model"] != model:
            continue
        if prompt_sha256 is not None and entry["prompt_sha256"] != prompt_sha256:
            continue
        found.add(entry)
    return found


def read_cache(path, model: Optional[str] = None, prompt_sha256: Optional[str] = None) -> dict:
    """caption -> explanation for every usable line (optionally only one model / prompt); the last
    line for a caption wins, keyed or not."""
    return read_explanations_cache(path, model, prompt_sha256).by_caption


def cached_keys(*paths) -> set:
    """The keys (key_of) that have a usable explanation in any of `paths`."""
    keys = set()
    for path in paths:
        for entry in iter_entries(path):
            if is_ok(entry):
                keys.add(key_of(entry))
    return keys


def repair_tail(path) -> int:
    """Cut a partly written last line off `path`; returns the number of bytes dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        # read backwards in blocks until the last newline
        end = size
        block = 1 << 16
        pos = size
        keep = 0
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            pos = start
        if keep != end:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return end - keep


class CacheWriter:
    """Appends one line per explanation; each line goes out in a single write so a kill
    leaves at most one partial last line, which the next run cuts off."""

    def __init__(self, path):
        self.path = Path(path)
        if self.path.is_dir():
            raise EclipError(f"{self.path}: explanation cache is a folder, not a JSONL file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dropped_bytes = repair_tail(self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, entry: dict) -> None:
        data = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def close(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def merge_parts(path, parts) -> dict:
    """Append the lines of per-process part files to the main cache, skipping keys the
    cache already holds a good line for (so merging twice adds nothing), then delete them.
    Returns counts of merged good and failed lines."""
    good = cached_keys(path)
    good_before = set(good)
    entries = [entry for part in parts for entry in iter_entries(part)]
    good_in_parts = {key_of(e) for e in entries if is_ok(e)}
    failed = set()
    with CacheWriter(path) as writer:
        for entry in entries:
            k = key_of(entry)
            if k in good or (not is_ok(entry) and (k in good_in_parts or k in failed)):
                continue  # already cached, or a failure that a later attempt made good
            writer.append(entry)
            (good if is_ok(entry) else failed).add(k)
    merged = {"generated": len(good_in_parts - good_before), "failed": len(failed)}
    for part in parts:
        Path(part).unlink(missing_ok=True)
    return merged
