"""The explanation cache: one JSON object per line, appended as explanations arrive.

Line format (read by `eclip train --explanations`):
    {"id": str|null, "caption": str, "explanation": str|null, "model": str,
     "prompt_sha256": str, "error": str|null}

The cache key is (caption, model, prompt_sha256). A line with an error or no
explanation does not count as cached: the next run tries that caption again.
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
               error: Optional[str] = None) -> dict:
    return {"id": None if id is None else str(id), "caption": caption, "explanation": explanation,
            "model": model, "prompt_sha256": prompt_sha256, "error": error}


def is_ok(entry: dict) -> bool:
    """True when the line holds a usable explanation."""
    return entry.get("error") is None and isinstance(entry.get("explanation"), str) and bool(entry["explanation"])


def key_of(entry: dict) -> tuple:
    return (entry["caption"], entry["model"], entry["prompt_sha256"])


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


def read_cache(path, model: Optional[str] = None, prompt_sha256: Optional[str] = None) -> dict:
    """caption -> explanation for every usable line (optionally only one model / prompt).

    This is what training consumes: lookup by caption text; failed lines count as missing.
    """
    path = Path(path)
    if not path.exists():
        raise EclipError(f"{path}: explanation cache not found (write it with `eclip explain --output {path}`)")
    found = {}
    for entry in iter_entries(path):
        if not is_ok(entry):
            continue
        if model is not None and entry["model"] != model:
            continue
        if prompt_sha256 is not None and entry["prompt_sha256"] != prompt_sha256:
            continue
        found[entry["caption"]] = entry["explanation"]
    return found


def cached_keys(*paths) -> set:
    """The keys (caption, model, prompt_sha256) that have a usable explanation in any of `paths`."""
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
