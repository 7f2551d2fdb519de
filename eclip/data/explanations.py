"""Join the explanations written by `eclip explain` onto records, for training.

The cache is keyed by caption text, not by record id, so one cache serves every
split and dataset file that shares captions, and re-reading a dataset with other
ids does not lose paid-for LLM output.
"""
from __future__ import annotations

from dataclasses import replace

from eclip.data.records import Record
from eclip.explain.cache import read_cache


def attach_explanations(records: list[Record], cache_path) -> tuple[list[Record], int]:
    """Records with `explanation` filled from the cache, and how many found none.

    The last usable line for a caption wins; failed lines count as missing. A record
    the cache does not know keeps the explanation it came with (None for the
    benchmarks), and training then falls back to its caption.
    The reader (`eclip.explain.cache.read_cache`) ignores a partly written last
    line and raises EclipError for a missing file or a malformed line.
    """
    found = read_cache(cache_path)
    out = [replace(r, explanation=found.get(r.caption, r.explanation)) for r in records]
    missing = sum(1 for r in out if not r.explanation)
    return out, missing
