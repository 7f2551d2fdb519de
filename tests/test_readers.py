"""Readers on user tables (the benchmarks: test_benchmarks.py)."""
import json
from pathlib import Path

import pytest

from benchmark_fixtures import visualnews
from eclip.data.readers import default_data_root, read_dataset
from eclip.errors import EclipError


def test_default_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("ECLIP_DATA", str(tmp_path))
    assert default_data_root("n24news") == tmp_path / "n24news"
    visualnews(tmp_path / "visualnews", "flat")
    assert len(read_dataset("visualnews", None, "train")) == 2
    monkeypatch.delenv("ECLIP_DATA")
    assert default_data_root("goodnews") == Path.home() / ".cache/eclip/data/goodnews"


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
