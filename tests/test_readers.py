"""Readers on small copies of each benchmark in its published layout, and on user tables."""
import json
from pathlib import Path

import pytest

from eclip.data.readers import default_data_root, read_dataset
from eclip.errors import EclipError


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def n24news(root: Path) -> Path:
    def rec(i, caption):
        return {"image_id": f"img{i}", "caption": caption, "headline": f"Headline {i}", "abstract": "...",
                "section": "Science", "image_url": "http://x", "article_url": "http://y", "article_id": f"a{i}"}
    write_json(root / "news/nytimes_train.json", [rec(1, "Eileen Collins aboard the shuttle."),
                                                  rec(2, "A Falcon 9 lifts off with DSCOVR.")])
    write_json(root / "news/nytimes_dev.json", [rec(3, "Coffee at the Mansion House.")])
    write_json(root / "news/nytimes_test.json", [rec(4, "Chelsea the cat."), rec(5, None)])
    (root / "imgs").mkdir()
    return root


def visualnews(root: Path) -> Path:
    def rec(i, source):
        return {"id": i, "caption": f"caption {i}", "topic": "world", "source": source,
                "image_path": f"./{source}/images/0537/{i}.jpg", "article_path": f"./{source}/articles/{i}.txt"}
    write_json(root / "train.json", [rec(663, "bbc"), rec(7, "guardian")])
    write_json(root / "val.json", [rec(8, "usa_today")])
    write_json(root / "test.json", [rec(9, "washington_post")])
    return root


def goodnews(root: Path, folder="resized") -> Path:
    write_json(root / "captioning_dataset.json", {
        "5a1b": {"images": {"0": "Barack Obama in Chicago.", "1": "Michelle Obama."}, "headline": {"main": "h"},
                 "article": "text"},
        "6c2d": {"images": {"0": "Angela Merkel in Berlin."}, "headline": {"main": "h2"}, "article": "text2"},
    })
    write_json(root / "img_splits.json", {"5a1b_0.jpg": "train", "5a1b_1": "test", "6c2d_0.jpg": "train"})
    (root / folder).mkdir()
    return root


def test_n24news_splits_ids_captions_paths(tmp_path):
    root = n24news(tmp_path / "n24")
    train = read_dataset("n24news", root, "train")
    assert [r.id for r in train] == ["img1", "img2"]
    assert train[0].caption == "Eileen Collins aboard the shuttle."     # the caption, not the headline
    assert train[0].image == str((root / "imgs/img1.jpg").resolve())
    assert Path(train[0].image).is_absolute()
    assert [r.id for r in read_dataset("n24news", root, "val")] == ["img3"]
    assert [r.id for r in read_dataset("N24News", root, "dev")] == ["img3"]


def test_benchmark_pairs_without_caption_are_left_out(tmp_path):
    assert [r.id for r in read_dataset("n24news", n24news(tmp_path), "test")] == ["img4"]


def test_visualnews_paths_relative_to_root(tmp_path):
    root = visualnews(tmp_path / "vn")
    train = read_dataset("visualnews", root, "train")
    assert [(r.id, r.caption) for r in train] == [("663", "caption 663"), ("7", "caption 7")]
    assert train[0].image == str(root.resolve() / "bbc/images/0537/663.jpg")
    assert [r.id for r in read_dataset("visualnews", root, "dev")] == ["8"]


def test_goodnews_split_and_image_folder(tmp_path):
    root = goodnews(tmp_path / "gn")
    train = read_dataset("goodnews", root, "train")
    assert {(r.id, r.caption) for r in train} == {("5a1b_0", "Barack Obama in Chicago."),
                                                  ("6c2d_0", "Angela Merkel in Berlin.")}
    assert all(r.image == str(root.resolve() / "resized" / f"{r.id}.jpg") for r in train)
    assert [r.id for r in read_dataset("goodnews", root, "test")] == ["5a1b_1"]
    assert read_dataset("goodnews", root, "val") == []


def test_goodnews_original_images_folder(tmp_path):
    root = goodnews(tmp_path / "gn", folder="images")
    assert read_dataset("goodnews", root, "test")[0].image == str(root.resolve() / "images/5a1b_1.jpg")


def test_default_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("ECLIP_DATA", str(tmp_path))
    assert default_data_root("n24news") == tmp_path / "n24news"
    visualnews(tmp_path / "visualnews")
    assert len(read_dataset("visualnews", None, "train")) == 2
    monkeypatch.delenv("ECLIP_DATA")
    assert default_data_root("goodnews") == Path.home() / ".cache/eclip/data/goodnews"


@pytest.mark.parametrize("name", ["n24news", "visualnews", "goodnews"])
def test_missing_data_root_names_path_and_layout(tmp_path, name):
    with pytest.raises(EclipError, match="data root not found") as info:
        read_dataset(name, tmp_path / "absent", "train")
    assert str(tmp_path / "absent") in str(info.value) and "\n" not in str(info.value)


def test_missing_split_file_names_path(tmp_path):
    root = n24news(tmp_path)
    (root / "news/nytimes_test.json").unlink()
    with pytest.raises(EclipError, match="nytimes_test.json") as info:
        read_dataset("n24news", root, "test")
    assert "expected news/nytimes_{train,dev,test}.json" in str(info.value)
    (root / "imgs").rmdir()
    goodnews(root)
    (root / "img_splits.json").unlink()
    with pytest.raises(EclipError, match="img_splits.json"):
        read_dataset("goodnews", root, "train")


def test_unknown_split_and_dataset(tmp_path):
    with pytest.raises(EclipError, match="unknown split 'valid'"):
        read_dataset("visualnews", visualnews(tmp_path), "valid")
    with pytest.raises(EclipError, match="neither a benchmark"):
        read_dataset("coco", None, "train")


def test_invalid_json_and_wrong_structure(tmp_path):
    root = visualnews(tmp_path)
    (root / "train.json").write_text('[{"id": 1,\n "caption": "x"\n "image_path": "a.jpg"}]')
    with pytest.raises(EclipError, match=r"train.json line 3: invalid JSON"):
        read_dataset("visualnews", root, "train")
    write_json(root / "train.json", {"id": 1})
    with pytest.raises(EclipError, match="expected a JSON list"):
        read_dataset("visualnews", root, "train")
    write_json(root / "train.json", [{"id": 1, "caption": "x"}])
    with pytest.raises(EclipError, match="record 0 lacks 'image_path'"):
        read_dataset("visualnews", root, "train")


def test_duplicate_ids_refused(tmp_path):
    root = visualnews(tmp_path)
    write_json(root / "val.json", [{"id": 1, "caption": "a", "image_path": "./a.jpg"},
                                   {"id": 1, "caption": "b", "image_path": "./b.jpg"}])
    with pytest.raises(EclipError, match="duplicate id '1'"):
        read_dataset("visualnews", root, "val")


def test_benchmark_image_path_may_not_leave_root(tmp_path):
    root = visualnews(tmp_path / "vn")
    for bad in ("../../etc/passwd", "/etc/passwd"):
        write_json(root / "test.json", [{"id": 1, "caption": "x", "image_path": bad}])
        with pytest.raises(EclipError, match="leaves") as info:
            read_dataset("visualnews", root, "test")
        assert "test.json" in str(info.value) and bad in str(info.value)
    root = n24news(tmp_path / "n24")
    write_json(root / "news/nytimes_test.json", [{"image_id": "../../../etc/passwd", "caption": "x"}])
    with pytest.raises(EclipError, match="leaves"):
        read_dataset("n24news", root, "test")


# --- generic tables ----------------------------------------------------------------------

def test_jsonl_table(tmp_path, real_images):
    path = tmp_path / "pairs" / "mine.jsonl"
    path.parent.mkdir()
    (path.parent / "photos").mkdir()
    lines = [
        {"image": "photos/a.jpg", "text": "Eileen Collins.", "id": "eileen",
         "entities": [{"text": "Eileen Collins", "type": "PERSON"}], "explanation": "An astronaut."},
        {"image": str(real_images["rocket"]), "text": "A Falcon 9."},   # absolute: allowed
        {"image": "b.jpg", "caption": "Record.to_dict lines read back too.", "entities": ["NASA"]},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" + json.dumps(lines[2]) + "\n")
    records = read_dataset(str(path))
    assert [r.id for r in records] == ["eileen", "2", "4"]           # default id: the line number
    assert records[0].image == str(path.parent.resolve() / "photos/a.jpg")
    assert records[0].entities == [{"text": "Eileen Collins", "type": "PERSON"}]
    assert records[0].explanation == "An astronaut."
    assert records[1].image == str(real_images["rocket"]) and records[1].explanation is None
    assert records[2].caption.startswith("Record.to_dict") and records[2].entities == [{"text": "NASA", "type": ""}]


def test_csv_table_with_entities_as_json_string(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text('image,text,entities\n'
                    'a.jpg,"Merkel, in Berlin","[{""text"": ""Angela Merkel"", ""type"": ""PERSON""}]"\n'
                    'b.jpg,A flag,\n', encoding="utf-8-sig")
    records = read_dataset(str(path), split="test")
    assert [(r.id, r.caption) for r in records] == [("2", "Merkel, in Berlin"), ("3", "A flag")]
    assert records[0].entities == [{"text": "Angela Merkel", "type": "PERSON"}] and records[1].entities == []
    assert records[1].image == str(tmp_path.resolve() / "b.jpg")


def test_table_missing_field_names_file_and_line(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"image": "a.jpg", "text": "ok"}\n{"image": "b.jpg"}\n')
    with pytest.raises(EclipError, match=r"mine.jsonl line 2: missing field 'text'"):
        read_dataset(str(path))
    csv = tmp_path / "mine.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(EclipError, match=r"mine.csv line 2: missing field 'image'"):
        read_dataset(str(csv))


def test_table_bad_json_line_and_bad_entities(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"image": "a.jpg", "text": "ok"}\n{"image": "b.jpg", \n')
    with pytest.raises(EclipError, match=r"line 2: invalid JSON"):
        read_dataset(str(path))
    path.write_text('{"image": "a.jpg", "text": "ok", "entities": "Merkel"}\n')
    with pytest.raises(EclipError, match=r"line 1: 'entities' is not a JSON list"):
        read_dataset(str(path))


def test_table_relative_path_may_not_escape(tmp_path):
    path = tmp_path / "data" / "mine.jsonl"
    path.parent.mkdir()
    path.write_text('{"image": "ok.jpg", "text": "fine"}\n{"image": "../../etc/passwd", "text": "x"}\n')
    with pytest.raises(EclipError) as info:
        read_dataset(str(path))
    message = str(info.value)
    assert "mine.jsonl line 2" in message and "../../etc/passwd" in message and "leaves" in message


def test_table_missing_file_and_duplicate_ids(tmp_path):
    with pytest.raises(EclipError, match="absent.jsonl: dataset file not found"):
        read_dataset(str(tmp_path / "absent.jsonl"))
    path = tmp_path / "mine.jsonl"
    path.write_text('{"image": "a.jpg", "text": "a", "id": "x"}\n{"image": "b.jpg", "text": "b", "id": "x"}\n')
    with pytest.raises(EclipError, match="duplicate id 'x'"):
        read_dataset(str(path))


# --- explanations -----------------------------------------------------------------------

def cache_line(caption, explanation, error=None):
    return json.dumps({"id": None, "caption": caption, "explanation": explanation, "model": "smollm2",
                       "prompt_sha256": "abc", "error": error}) + "\n"


def test_explanations_matched_by_caption(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ECLIP_QUIET", raising=False)
    root = visualnews(tmp_path / "vn")
    cache = tmp_path / "explanations.jsonl"
    cache.write_text(cache_line("caption 663", "old text") + cache_line("caption 663", "BBC: a photo.")
                     + cache_line("caption 7", None, error="timeout")
                     + '{"id": null, "caption": "caption 7", "explanation": "half wri')   # killed mid-line
    records = read_dataset("visualnews", root, "train", explanations=cache)
    assert records[0].explanation == "BBC: a photo."                 # the latest line wins
    assert records[1].explanation is None                            # failed line and partial line: missing
    assert records[1].training_explanation() == "caption 7"
    assert "1 fall back to their caption" in capsys.readouterr().err


def test_attach_explanations_counts_and_errors(tmp_path):
    from eclip.data.explanations import attach_explanations
    from eclip.data.records import Record
    records = [Record("1", "/a.jpg", "Merkel in Berlin."), Record("2", "/b.jpg", "Obama.", explanation="own")]
    cache = tmp_path / "c.jsonl"
    cache.write_text(cache_line("Merkel in Berlin.", "Angela Merkel, chancellor."))
    out, missing = attach_explanations(records, cache)
    assert [r.explanation for r in out] == ["Angela Merkel, chancellor.", "own"] and missing == 0
    assert records[0].explanation is None                            # the input is left as it was
    _, missing = attach_explanations([Record("3", "/c.jpg", "Unknown.")], cache)
    assert missing == 1
    cache.write_text(cache_line("x", "y") + "not json\n" + cache_line("z", "w"))
    with pytest.raises(EclipError, match="line 2"):
        attach_explanations(records, cache)
    with pytest.raises(EclipError, match="not found"):
        attach_explanations(records, tmp_path / "absent.jsonl")


# --- malformed tables: one line naming the file and the line ------------------------------

LATIN1 = "Angela Merkel in K\u00f6ln".encode("latin-1")   # 0xf6: not UTF-8


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_table_not_utf8_names_file_and_line(tmp_path, suffix):
    path = tmp_path / f"mine{suffix}"
    if suffix == ".jsonl":
        path.write_bytes(b'{"image": "a.jpg", "text": "fine"}\n{"image": "b.jpg", "text": "' + LATIN1 + b'"}\n')
    else:
        path.write_bytes(b'image,text\na.jpg,fine\nb.jpg,"' + LATIN1 + b'"\n')
    with pytest.raises(EclipError) as info:
        read_dataset(str(path))
    line = 2 if suffix == ".jsonl" else 3   # the CSV's header is line 1
    assert str(info.value).startswith(f"{path} line {line}: not UTF-8")


def test_table_field_of_the_wrong_type_is_named(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"image": "a.jpg", "text": 123}\n')
    with pytest.raises(EclipError, match=r"mine.jsonl line 1: 'text' must be a string \(got int\)"):
        read_dataset(str(path))
    path.write_text('{"image": ["a.jpg"], "text": "t"}\n')
    with pytest.raises(EclipError, match=r"mine.jsonl line 1: 'image' must be a string \(got list\)"):
        read_dataset(str(path))


@pytest.mark.parametrize("rid", [{"a": 1}, [1, 2], True])
def test_table_id_that_is_not_a_string_or_number_is_refused(tmp_path, rid):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"image": "a.jpg", "text": "t", "id": rid}) + "\n")
    with pytest.raises(EclipError, match=r"mine.jsonl line 1: 'id' must be a string or a number"):
        read_dataset(str(path))


def test_table_numeric_ids_still_read(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"image": "a.jpg", "text": "t", "id": 7}\n{"image": "b.jpg", "text": "u", "id": "x"}\n')
    assert [r.id for r in read_dataset(str(path))] == ["7", "x"]


def test_csv_unterminated_quote_is_refused(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text('image,text\na.jpg,fine\nb.jpg,"never closed\nc.jpg,swallowed\n')
    with pytest.raises(EclipError, match=r"mine.csv line 3: .*quote"):
        read_dataset(str(path))
