"""The explanation cache file: valid whatever moment a run was killed at, and the
pure pieces of explain (deduplication, the split across processes)."""
import json

import pytest

from eclip.errors import EclipError
from eclip.explain import shard, unique_captions
from eclip.explain.cache import (CacheWriter, cached_keys, iter_entries, make_entry, merge_parts,
                                 read_cache, repair_tail)
from eclip.data.records import Record


def line(caption, explanation="an explanation", model="m", sha="p", error=None, id=None):
    return json.dumps(make_entry(id, caption, explanation, model, sha, error)) + "\n"


def test_partial_last_line_is_ignored_then_cut_off(tmp_path):
    cache = tmp_path / "c.jsonl"
    cache.write_text(line("a") + line("b") + '{"id": null, "caption": "c", "expl')
    assert read_cache(cache) == {"a": "an explanation", "b": "an explanation"}
    with CacheWriter(cache) as w:
        assert w.dropped_bytes > 0
        w.append(make_entry("3", "c", "third", "m", "p"))
    lines = cache.read_text().splitlines()
    assert [json.loads(x)["caption"] for x in lines] == ["a", "b", "c"]


def test_repair_tail_keeps_a_clean_file_and_handles_no_newline_at_all(tmp_path):
    cache = tmp_path / "c.jsonl"
    cache.write_text(line("a"))
    assert repair_tail(cache) == 0 and read_cache(cache) == {"a": "an explanation"}
    cache.write_bytes(b'{"caption": "half')
    assert repair_tail(cache) == len(b'{"caption": "half') and cache.read_bytes() == b""


def test_failed_lines_count_as_missing_and_later_lines_win(tmp_path):
    cache = tmp_path / "c.jsonl"
    cache.write_text(line("a", None, error="HTTP 500") + line("b", "old") + line("b", "new")
                     + line("c", "other model", model="x"))
    assert read_cache(cache) == {"b": "new", "c": "other model"}
    assert read_cache(cache, model="m") == {"b": "new"}
    assert cached_keys(cache) == {("b", "m", "p"), ("c", "x", "p")}


def test_corrupt_line_in_the_middle_is_a_clear_error(tmp_path):
    cache = tmp_path / "c.jsonl"
    cache.write_text(line("a") + "not json\n" + line("b"))
    with pytest.raises(EclipError, match="line 2 is not valid JSON"):
        read_cache(cache)
    cache.write_text('{"text": "no caption field"}\n')
    with pytest.raises(EclipError, match="line 1 lacks caption"):
        read_cache(cache)


def test_missing_cache_is_a_clear_error_for_readers(tmp_path):
    with pytest.raises(EclipError, match="explanation cache not found"):
        read_cache(tmp_path / "nope.jsonl")
    assert list(iter_entries(tmp_path / "nope.jsonl")) == []


def test_merge_parts_is_idempotent_and_drops_failures_made_good(tmp_path):
    cache = tmp_path / "c.jsonl"
    cache.write_text(line("a"))
    p0, p1 = tmp_path / "c.jsonl.part-0", tmp_path / "c.jsonl.part-1"
    p0.write_text(line("a") + line("b", None, error="timeout") + line("b", "good b"))
    p1.write_text(line("c") + line("d", None, error="HTTP 500") + '{"partial')
    merged = merge_parts(cache, [p0, p1])
    assert merged == {"generated": 2, "failed": 1}
    assert not p0.exists() and not p1.exists()
    captions = [e["caption"] for e in iter_entries(cache)]
    assert captions == ["a", "b", "c", "d"]
    assert read_cache(cache) == {"a": "an explanation", "b": "good b", "c": "an explanation"}


def test_unique_captions_dedupes_keeps_first_id_and_limits():
    records = [Record("r1", "/i1.jpg", "Obama in Paris"), Record("r2", "/i2.jpg", "Obama in Paris"),
               {"id": "r3", "caption": "Merkel in Berlin"}, "Macron in Lyon", "  ", "Merkel in Berlin"]
    items, n = unique_captions(records)
    assert items == [("r1", "Obama in Paris"), ("r3", "Merkel in Berlin"), (None, "Macron in Lyon")]
    assert n == 6
    items, _ = unique_captions(records, limit=2)
    assert [c for _, c in items] == ["Obama in Paris", "Merkel in Berlin"]


@pytest.mark.parametrize("n,world", [(0, 2), (1, 2), (7, 2), (10, 3), (5, 8)])
def test_shard_splits_disjoint_complete_and_balanced(n, world):
    items = list(range(n))
    shares = [shard(items, r, world) for r in range(world)]
    flat = sorted(x for s in shares for x in s)
    assert flat == items
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        shard(items, world, world)
