"""Join explanations onto records, for training, from either of two files:

- the cache `eclip explain` writes (JSON lines keyed by caption text, and by sample key for
  shards, parquet and files folders): a record takes the line written for its own id and caption,
  else the last line for its caption, so one cache serves every split and dataset file that shares
  captions, and re-reading a dataset with other ids does not lose paid-for LLM output;
- the EntityCLIP authors' released `CapDsc_mistral_{split}.json`: one JSON object mapping an
  image to its explanation. Their code keys N24News and GoodNews by image file name and
  VisualNews by the image's path on their machine ("/star/.../images//bbc/images/0537/663.jpg"),
  so a record is matched on the last `key_parts` parts of its image path (the benchmark
  reader says how many: 1, or 4 for VisualNews's source/images/folder/file).

Any other file is refused with one line: a file that is neither must never read as an empty
cache and let training run on captions as explanations unannounced.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from eclip.data.records import Record
from eclip.errors import EclipError

IMAGE_SUFFIXES = {"jpg", "jpeg", "png", "gif", "bmp", "webp", "tif", "tiff"}
CACHE = "an eclip explain cache"
AUTHORS = "the EntityCLIP authors' image -> explanation file"
NEITHER = ("neither an eclip explanation cache (JSON lines with caption, model, prompt_sha256) nor the "
           "EntityCLIP authors' CapDsc_mistral file (one JSON object: image file name -> explanation)")


def attach_explanations(records: list[Record], path, key_parts: int = 1) -> tuple[list[Record], int, str]:
    """(records with `explanation` filled, how many found none, which kind of file it was).

    Cache: the line for the record's id and caption (eclip.explain.cache), else the last usable
    line for its caption; failed lines count as missing. Authors' file: looked up by the last
    `key_parts` parts of the record's image path. A record the file does not know keeps the
    explanation it came with (None for the benchmarks), and training then falls back to its caption.
    """
    kind, found = read_explanations(path)
    if kind == AUTHORS:
        index = _by_tail(found, key_parts)
        out = [replace(r, explanation=index.get(_tail(r.image, key_parts), r.explanation)) for r in records]
    else:
        out = [replace(r, explanation=found.lookup(r.id, r.caption, r.explanation)) for r in records]
    missing = sum(1 for r in out if not r.explanation)
    return out, missing, kind


def read_explanations(path) -> tuple[str, object]:
    """(CACHE, eclip.explain.cache.Explanations) or (AUTHORS, image key -> explanation); EclipError otherwise.

    The authors' file is one JSON document (json.dump writes no final newline): parsed whole
    first. A cache is JSON lines whose reader (eclip.explain.cache.read_cache) ignores a partly
    written last line; a file with no complete line is not a cache.
    """
    from eclip.explain.cache import Explanations, is_ok, read_explanations_cache
    path = Path(path)
    if not path.exists():
        return CACHE, read_explanations_cache(path)          # its "not found" error names `eclip explain`
    if path.is_dir():
        raise EclipError(f"{path}: explanations file is a folder, not a file")
    data = path.read_bytes()
    if not data.strip():
        return CACHE, Explanations()
    try:
        whole = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        whole = None
    if isinstance(whole, dict):
        if isinstance(whole.get("caption"), str) and isinstance(whole.get("model"), str):
            one = Explanations()                # one line, no newline
            if is_ok(whole):
                one.add(whole)
            return CACHE, one
        if whole and all(_image_name(k) and isinstance(v, str) for k, v in whole.items()):
            return AUTHORS, whole
        raise EclipError(f"{path}: {NEITHER}")
    if whole is not None or b"\n" not in data or not _looks_like_cache_line(data.split(b"\n", 1)[0]):
        raise EclipError(f"{path}: {NEITHER}")
    return CACHE, read_explanations_cache(path)


def _image_name(key: str) -> bool:
    return key.lower().rsplit(".", 1)[-1] in IMAGE_SUFFIXES


def _looks_like_cache_line(line: bytes) -> bool:
    try:
        entry = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(entry, dict) and isinstance(entry.get("caption"), str) and isinstance(entry.get("model"), str)


def _tail(path: str, parts: int) -> str:
    """The last `parts` parts of a path, '/'-joined ('//' and './' folded, as the authors' keys have them)."""
    pieces = [p for p in str(path).replace("\\", "/").split("/") if p not in ("", ".")]
    return "/".join(pieces[-parts:])


def _by_tail(found: dict, parts: int) -> dict:
    return {_tail(key, parts): text for key, text in found.items()}
