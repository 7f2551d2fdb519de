"""Explanations of shard, parquet and files-folder data are keyed by the sample key: two samples with
one caption carry an explanation each, from `explain` to both of train's read paths; caption-keyed
caches (tables, older eclip) still serve them."""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from data_formats import jpeg
from eclip.cli import app
from eclip.data.readers import read_dataset
from eclip.data.shardset import open_shard_set
from eclip.data.stream import ShardStream
from eclip.explain import explain_records
from eclip.explain.cache import iter_entries, make_entry, merge_parts, read_cache

SAME = "Angela Merkel speaks in Berlin."
OTHER = "Boris Johnson in Downing Street."
SAMPLES = [("a", SAME, None), ("b", SAME, None), ("c", OTHER, "from the json member"), ("d", OTHER, None)]


class CountingLLM:
    """A sampling LLM's behaviour: every answer differs, even for the same prompt."""
    name = "counting-llm"

    def __init__(self):
        self.prompts = []

    def generate(self, prompts):
        for i, p in enumerate(prompts):
            self.prompts.append(p)
            yield i, f"answer {len(self.prompts)}", None


@pytest.fixture
def shards(tmp_path):
    """Four samples in two shards written by webdataset's ShardWriter; a and b share a caption."""
    import webdataset as wds
    rng = np.random.default_rng(0)
    (tmp_path / "shards").mkdir()
    with wds.ShardWriter(str(tmp_path / "shards" / "%05d.tar"), maxcount=2, verbose=0) as w:
        for key, caption, explanation in SAMPLES:
            meta = {"key": key, **({"explanation": explanation} if explanation else {})}
            w.write({"__key__": key, "jpg": jpeg(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)),
                     "txt": caption, "json": meta})
    return str(tmp_path / "shards" / "{00000..00001}.tar")


def streamed(shards, cache):
    """{key: explanation} as train --shuffle-buffer tokenizes it (the tokenizer here is the identity)."""
    stream = ShardStream(open_shard_set(shards, explanations=cache), lambda im: im.size, lambda texts: list(texts),
                         0, 0, 4)
    items = sorted(stream, key=lambda item: item["index"])
    return dict(zip([k for k, _, _ in SAMPLES], [item["explanation_tokens"] for item in items]))


def test_two_samples_with_one_caption_get_an_explanation_each(shards, tmp_path):
    out = CliRunner(mix_stderr=False).invoke(app, ["explain", "--dataset", shards, "--dry-run", "--json"])
    assert out.exit_code == 0, out.stderr
    assert [p["id"] for p in json.loads(out.stdout)["prompts"]] == ["a", "b", "c", "d"]   # one per sample

    cache = tmp_path / "explanations.jsonl"
    llm = CountingLLM()
    summary = explain_records(read_dataset(shards), llm, cache, show_progress=False)
    assert (summary["per"], summary["generated"]) == ("sample", 4)
    assert [(e["key"], e["caption"]) for e in iter_entries(cache)] == [(k, c) for k, c, _ in SAMPLES]
    assert explain_records(read_dataset(shards), llm, cache, show_progress=False)["cached"] == 4   # resumes
    assert len(llm.prompts) == 4

    by_record = {r.id: r.explanation for r in read_dataset(shards, explanations=cache)}   # train's record path
    assert by_record == {"a": "answer 1", "b": "answer 2", "c": "answer 3", "d": "answer 4"}
    assert streamed(shards, cache) == by_record                                          # train --shuffle-buffer
    assert read_cache(cache)[SAME] == "answer 2"      # older eclip, and tables, read it by caption: last line wins


def test_a_caption_keyed_cache_still_serves_every_sample_and_a_keyed_line_wins(shards, tmp_path):
    cache = tmp_path / "old.jsonl"
    lines = [make_entry("a", SAME, "caption-wide", "m", "p"),           # as eclip wrote every line before
             make_entry("d", OTHER, "caption-wide other", "m", "p"),
             make_entry("b", SAME, "b's own", "m", "p", key="b")]
    cache.write_text("".join(json.dumps(e) + "\n" for e in lines))
    assert "key" not in lines[0]
    want = {"a": "caption-wide", "b": "b's own", "c": "caption-wide other", "d": "caption-wide other"}
    assert {r.id: r.explanation for r in read_dataset(shards, explanations=cache)} == want
    assert streamed(shards, cache) == want

    table = tmp_path / "pairs.jsonl"           # a table's records are looked up by their id too, then caption
    table.write_text("".join(json.dumps({"id": k, "image": "x.jpg", "text": c}) + "\n" for k, c, _ in SAMPLES))
    assert {r.id: r.explanation for r in read_dataset(str(table), explanations=cache)} == want


def test_explain_counts_a_caption_wide_line_as_cached_for_every_sample_of_its_caption(shards, tmp_path):
    from eclip.explain.prompt import DEFAULT_TEMPLATE, prompt_sha256
    cache = tmp_path / "old.jsonl"
    cache.write_text(json.dumps(make_entry("a", SAME, "paid for", "counting-llm", prompt_sha256(DEFAULT_TEMPLATE)))
                     + "\n")
    llm = CountingLLM()
    summary = explain_records(read_dataset(shards), llm, cache, show_progress=False)
    assert (summary["cached"], summary["generated"]) == (2, 2) and all(SAME not in p for p in llm.prompts)


def test_the_json_members_explanation_is_read_and_the_cache_line_wins_on_both_paths(shards, tmp_path):
    records = {r.id: r for r in read_dataset(shards)}
    assert records["c"].explanation == "from the json member" and records["d"].explanation is None
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert streamed(shards, empty)["c"] == "from the json member"

    cache = tmp_path / "c.jsonl"
    cache.write_text(json.dumps({**make_entry("c", OTHER, "from the cache", "m", "p"), "key": "c"}) + "\n")
    assert {r.id: r.explanation for r in read_dataset(shards, explanations=cache)}["c"] == "from the cache"
    assert streamed(shards, cache)["c"] == "from the cache"        # the same on the streaming path


def test_merging_process_parts_keeps_each_samples_line(tmp_path):
    cache, p0, p1 = tmp_path / "c.jsonl", tmp_path / "c.jsonl.part-0", tmp_path / "c.jsonl.part-1"
    p0.write_text(json.dumps(make_entry("a", SAME, "one", "m", "p", key="a")) + "\n")
    p1.write_text(json.dumps(make_entry("b", SAME, "two", "m", "p", key="b")) + "\n")
    assert merge_parts(cache, [p0, p1])["generated"] == 2
    assert [e["explanation"] for e in iter_entries(cache)] == ["one", "two"]


def test_a_parquet_set_is_explained_per_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(1)
    images = [jpeg(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(2)]
    pq.write_table(pa.table({"id": ["r1", "r2"], "jpg": pa.array(images, type=pa.binary()),
                             "caption": [SAME, SAME]}), tmp_path / "pairs.parquet")
    cache = tmp_path / "c.jsonl"
    explain_records(read_dataset(str(tmp_path / "pairs.parquet")), CountingLLM(), cache, show_progress=False)
    got = {r.id: r.explanation for r in read_dataset(str(tmp_path / "pairs.parquet"), explanations=cache)}
    assert got == {"r1": "answer 1", "r2": "answer 2"}
