"""--explanations: an `eclip explain` cache or the EntityCLIP authors' CapDsc_mistral file, and
nothing else."""
import json

import pytest

from benchmark_fixtures import VISUALNEWS, goodnews_authors, n24news_archive, visualnews, write_json
from eclip.data.explanations import AUTHORS, CACHE, attach_explanations
from eclip.data.readers import read_dataset
from eclip.data.records import Record
from eclip.errors import EclipError


def cache_line(caption, explanation, error=None):
    return json.dumps({"id": None, "caption": caption, "explanation": explanation, "model": "smollm2",
                       "prompt_sha256": "abc", "error": error}) + "\n"


def test_authors_file_on_one_line_without_newline_is_read_not_taken_for_a_half_written_cache(tmp_path):
    """Before: the released file (json.dump: one line, no final newline) read as an empty cache, every
    record fell back to its caption, and training went on with exit 0."""
    root = n24news_archive(tmp_path / "n24")
    capdsc = write_json(root / "news/CapDsc_mistral_train.json",
                        {"img1.jpg": "Eileen Collins, NASA astronaut.", "img2.jpg": "DSCOVR, a NOAA satellite."})
    assert not capdsc.read_bytes().endswith(b"\n")
    records = read_dataset("n24news", root, "train", explanations=capdsc)
    assert [r.explanation for r in records] == ["Eileen Collins, NASA astronaut.", "DSCOVR, a NOAA satellite."]
    _, missing, kind = attach_explanations(records[:1] + [Record("x", "/elsewhere/img9.jpg", "?")], capdsc)
    assert missing == 1 and kind == AUTHORS


def test_visualnews_authors_file_keyed_by_their_image_paths(tmp_path):
    """The reference looks VisualNews explanations up by the image's path on the authors' machine
    (ROOT/images/ + image_path[1:], '/hfut/' -> '/star/'): same file name in other folders must not match."""
    root = visualnews(tmp_path / "vn", "authors")
    keys = {f"/star/wyx/VisualNews/images/{d['image_path'][1:]}": f"about {d['id']}" for d in VISUALNEWS}
    keys["/star/wyx/VisualNews/images//bbc/images/0001/663.jpg"] = "another 663.jpg"
    capdsc = write_json(root / "CapDsc_mistral_test.json", keys)
    records = read_dataset("visualnews", root, "test", explanations=capdsc)
    assert [r.explanation for r in records] == [f"about {d['id']}" for d in VISUALNEWS]


def test_goodnews_authors_file_keyed_by_file_name(tmp_path):
    root = goodnews_authors(tmp_path / "gn")
    capdsc = write_json(root / "train_cap_individual/New_Corr_CapDsc_mistral_val.json",
                        {"6c2d_0.jpg": "Angela Merkel, German chancellor."})
    records = read_dataset("goodnews", root, "val", explanations=capdsc)
    assert [(r.id, r.explanation) for r in records] == [("6c2d_0", "Angela Merkel, German chancellor.")]


@pytest.mark.parametrize("content", [
    '["a list", "of strings"]',                          # JSON, but not an object
    '{"img1.jpg": {"text": "nested"}}',                  # an object whose values are not text
    'image,explanation\nimg1.jpg,"An astronaut."\n',      # CSV
    'img1.jpg An astronaut.',                            # text without a single complete line
    '{"image": "img1.jpg", "text": "x"}\n',              # a JSON line that is no cache entry
])
def test_a_file_that_is_neither_is_refused_in_one_line(tmp_path, content):
    path = tmp_path / "explanations.json"
    path.write_text(content)
    with pytest.raises(EclipError) as info:
        attach_explanations([Record("1", "/a/img1.jpg", "Eileen Collins.")], path)
    message = str(info.value)
    assert "neither an eclip explanation cache" in message and "CapDsc_mistral" in message
    assert "\n" not in message and str(path) in message


def test_cache_matched_by_caption(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ECLIP_QUIET", raising=False)
    root = visualnews(tmp_path / "vn", "flat")
    captions = [d["caption"] for d in VISUALNEWS[:2]]
    cache = tmp_path / "explanations.jsonl"
    cache.write_text(cache_line(captions[0], "old text") + cache_line(captions[0], "A mother and son.")
                     + cache_line(captions[1], None, error="timeout")
                     + json.dumps({"id": None, "caption": captions[1], "explanation": "half wri"}))   # killed mid-line
    records = read_dataset("visualnews", root, "train", explanations=cache)
    assert records[0].explanation == "A mother and son."            # the latest line wins
    assert records[1].explanation is None                            # failed line and partial line: missing
    assert records[1].training_explanation() == captions[1]
    assert "1 fall back to their caption" in capsys.readouterr().err


def test_a_one_line_cache_without_newline_still_counts(tmp_path):
    cache = tmp_path / "c.jsonl"
    cache.write_text(cache_line("Merkel in Berlin.", "Angela Merkel, chancellor.").rstrip("\n"))
    out, missing, kind = attach_explanations([Record("1", "/a.jpg", "Merkel in Berlin.")], cache)
    assert kind == CACHE and missing == 0 and out[0].explanation == "Angela Merkel, chancellor."


def test_attach_explanations_counts_and_errors(tmp_path):
    records = [Record("1", "/a.jpg", "Merkel in Berlin."), Record("2", "/b.jpg", "Obama.", explanation="own")]
    cache = tmp_path / "c.jsonl"
    cache.write_text(cache_line("Merkel in Berlin.", "Angela Merkel, chancellor."))
    out, missing, kind = attach_explanations(records, cache)
    assert [r.explanation for r in out] == ["Angela Merkel, chancellor.", "own"] and missing == 0 and kind == CACHE
    assert records[0].explanation is None                            # the input is left as it was
    assert attach_explanations([Record("3", "/c.jpg", "Unknown.")], cache)[1] == 1
    cache.write_text(cache_line("x", "y") + "not json\n" + cache_line("z", "w"))
    with pytest.raises(EclipError, match="line 2"):
        attach_explanations(records, cache)
    with pytest.raises(EclipError, match="not found"):
        attach_explanations(records, tmp_path / "absent.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert attach_explanations(records[:1], empty)[1] == 1          # an empty cache is a cache
