"""The offline demo set: real flags and photos, deterministic, with disjoint splits and safe unpickling."""
import json
import os
import pickle
import runpy
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eclip.data import demo_set
from eclip.data.demo_set import (SPLITS, build_demo_set, file_digests, flag_entities, flag_name,
                                 load_numpy_pickle, read_flag)
from eclip.errors import EclipError

ONTONOTES = {"PERSON", "NORP", "FAC", "ORG", "GPE", "LOC", "PRODUCT", "EVENT", "WORK_OF_ART", "LAW", "LANGUAGE"}
TYPES = ONTONOTES | {"ANIMAL"}      # OntoNotes has no type for a named animal
N_FLAGS, VIEWS, SIZE = 5, 4, 64


def read_split(root: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (root / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "data"
    result = build_demo_set(out, n_flags=N_FLAGS, views_per_entity=VIEWS, image_size=SIZE)
    return out, result


def test_counts_and_layout(small_set):
    out, result = small_set
    n_photos = len(demo_set.photo_entities())
    n = N_FLAGS + n_photos
    assert n_photos >= 8
    assert result["counts"] == {"train": n * (VIEWS - 2), "val": n, "test": n, "entities": n, "images": n * VIEWS}
    for split in SPLITS:
        assert result[split] == out / f"{split}.jsonl" and len(read_split(out, split)) == result["counts"][split]
    assert len(list((out / "images").glob("*/*.jpg"))) == n * VIEWS
    readme = (out / "README.txt").read_text()
    assert "flagpy" in readme and "grace-hopper" in readme
    assert not [p for p in out.parent.iterdir() if p.name != "data"], "temporary folders left behind"


def test_records_name_their_entities_and_images_load(small_set):
    out, _ = small_set
    for split in SPLITS:
        for rec in read_split(out, split):
            assert set(rec) == {"id", "image", "text", "entities"}
            assert rec["entities"], rec
            for ent in rec["entities"]:
                assert ent["text"] in rec["text"] and ent["type"] in TYPES
            with Image.open(out / rec["image"]) as im:
                assert im.format == "JPEG" and im.mode == "RGB" and im.size == (SIZE, SIZE)
    by_id = {r["id"]: r for s in SPLITS for r in read_split(out, s)}
    assert {"text": "Eileen Collins", "type": "PERSON"} in by_id["eileen-collins-0"]["entities"]
    assert by_id["chelsea-the-cat-0"]["entities"] == [{"text": "Chelsea", "type": "ANIMAL"}], "a cat is not a PERSON"
    assert {"text": "Cape Canaveral", "type": "LOC"} in by_id["dscovr-falcon-9-1"]["entities"]
    assert by_id["flag-afghanistan-0"]["entities"] == [{"text": "Afghanistan", "type": "GPE"}]


def test_splits_share_no_image_and_no_phrasing_of_an_entity(small_set):
    out, _ = small_set
    images, texts, pixels = defaultdict(dict), defaultdict(dict), defaultdict(dict)
    for split in SPLITS:
        for rec in read_split(out, split):
            entity = rec["image"].split("/")[1]
            images[entity].setdefault(split, set()).add(rec["image"])
            texts[entity].setdefault(split, set()).add(rec["text"])
            pixels[entity].setdefault(split, set()).add((out / rec["image"]).read_bytes())
    assert len(images) == N_FLAGS + len(demo_set.photo_entities())
    for entity in images:
        for table in (images, texts, pixels):
            assert set(table[entity]) == set(SPLITS), f"{entity} missing from a split"
            seen = [table[entity][s] for s in SPLITS]
            assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2]), entity
        assert len(texts[entity]["train"]) == VIEWS - 2, "train cycles through distinct phrasings"


def test_same_seed_same_bytes_other_seed_other_views(tmp_path, small_set):
    out, _ = small_set
    again = tmp_path / "again"
    build_demo_set(again, n_flags=N_FLAGS, views_per_entity=VIEWS, image_size=SIZE)
    assert file_digests(again) == file_digests(out)
    other = tmp_path / "other"
    build_demo_set(other, n_flags=N_FLAGS, views_per_entity=VIEWS, image_size=SIZE, seed=1, include_photos=False)
    a, b = file_digests(out), file_digests(other)
    assert a["images/flag-afghanistan/0.jpg"] != b["images/flag-afghanistan/0.jpg"]


def test_a_subset_draws_the_same_views_as_a_larger_build(tmp_path, small_set):
    out, _ = small_set
    fewer = tmp_path / "fewer"
    build_demo_set(fewer, n_flags=1, views_per_entity=VIEWS, image_size=SIZE, include_photos=False)
    assert (fewer / "images/flag-afghanistan/1.jpg").read_bytes() == (out / "images/flag-afghanistan/1.jpg").read_bytes()


def test_all_195_flags_read_as_images():
    flags = flag_entities()
    assert len(flags) == 195 and len({f.slug for f in flags}) == 195
    names = {f.entities[0]["text"] for f in flags}
    assert {"France", "Japan", "Bahamas", "Democratic Republic of the Congo", "São Tomé and Príncipe"} <= names
    japan = next(f for f in flags if f.slug == "flag-japan").image()
    assert japan.size == (180, 90)
    red = np.asarray(japan)[45, 90]            # the centre of the sun disc
    assert red[0] > 150 and red[1] < 80 and red[2] < 80
    assert [f.slug for f in flag_entities(3)] == [flags[0].slug, flags[65].slug, flags[130].slug]


def test_flag_names_read_as_in_a_sentence():
    assert flag_name("The Democratic Republic Of The Congo") == (
        "Democratic Republic of the Congo", "the Democratic Republic of the Congo")
    assert flag_name("Antigua And Barbuda") == ("Antigua and Barbuda", "Antigua and Barbuda")
    bahamas = next(f for f in flag_entities() if f.slug == "flag-bahamas")
    assert "The Bahamas' flag flying in the wind" in bahamas.captions["train"]


class _RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_flag_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_RunsCommand(f"touch {marker}"))
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        load_numpy_pickle(payload)
    assert not marker.exists(), "the pickle's command ran"
    with pytest.raises(pickle.UnpicklingError, match="builtins"):
        load_numpy_pickle(pickle.dumps(eval, protocol=4))          # a global that is not numpy's
    with pytest.raises(pickle.UnpicklingError, match="numpy array"):
        load_numpy_pickle(pickle.dumps({"a": 1}))                  # no global at all, but not an array

    bad = tmp_path / "flag.pkl"
    bad.write_bytes(payload)
    with pytest.raises(EclipError, match="flag.pkl"):
        read_flag(bad)
    assert not marker.exists()


def test_flag_unpickler_reads_plain_arrays(tmp_path):
    arr = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3)
    assert np.array_equal(load_numpy_pickle(pickle.dumps(arr)), arr)          # this numpy's own pickles
    good = tmp_path / "f.pkl"
    good.write_bytes(pickle.dumps(arr))
    assert read_flag(good).shape == (2, 4, 3)
    good.write_bytes(pickle.dumps(np.zeros((2, 4), np.float32)))
    with pytest.raises(EclipError, match=r"\(H, W, 3\) uint8"):
        read_flag(good)


def test_interrupted_build_keeps_the_previous_set(tmp_path, monkeypatch):
    out = tmp_path / "data"
    build_demo_set(out, n_flags=2, views_per_entity=3, image_size=32, include_photos=False)
    before = file_digests(out)

    def broken(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(demo_set, "photo_view", broken)
    with pytest.raises(KeyboardInterrupt):
        build_demo_set(out, n_flags=3, views_per_entity=3, image_size=32)
    assert file_digests(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]

    monkeypatch.undo()
    build_demo_set(out, n_flags=3, views_per_entity=3, image_size=32, include_photos=False)
    assert len(read_split(out, "test")) == 3, "an earlier demo set is replaced"


def test_never_replaces_a_folder_that_is_not_a_demo_set(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(EclipError, match="not an eclip demo set"):
        build_demo_set(out, n_flags=1, views_per_entity=3, include_photos=False)
    assert (out / "thesis.tex").read_text() == "precious"
    with pytest.raises(EclipError, match="views_per_entity"):
        build_demo_set(tmp_path / "x", n_flags=1, views_per_entity=2)
    with pytest.raises(EclipError, match="n_flags"):
        build_demo_set(tmp_path / "x", n_flags=500)


def test_example_script_builds_and_reports(tmp_path, monkeypatch, capsys):
    script = Path(__file__).resolve().parents[1] / "examples" / "build_demo_data.py"
    out = tmp_path / "data"
    monkeypatch.setattr(sys, "argv", [str(script), "--output", str(out), "--n-flags", "2", "--views", "3",
                                      "--image-size", "32", "--no-photos"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"]["train"] == 2 and Path(summary["test"]).is_file()

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    monkeypatch.setattr(sys, "argv", [str(script), "--output", str(tmp_path / "other"), "--n-flags", "1"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_records_read_back_through_eclip_readers(small_set):
    readers = pytest.importorskip("eclip.data.readers")
    out, _ = small_set
    records = readers.read_dataset(str(out / "val.jsonl"), None, "val")
    assert len(records) == len(read_split(out, "val"))
    assert all(Path(r.image).is_absolute() and Path(r.image).is_file() and r.entities for r in records)


def test_more_views_add_training_views_and_keep_val_and_test(tmp_path):
    """Views beyond the sixth train: the val and test pairs, images included, stay byte for byte."""
    six, eight = tmp_path / "six", tmp_path / "eight"
    build_demo_set(six, n_flags=3, views_per_entity=6, image_size=SIZE)
    build_demo_set(eight, n_flags=3, views_per_entity=8, image_size=SIZE)
    for split in ("val", "test"):
        assert (eight / f"{split}.jsonl").read_text() == (six / f"{split}.jsonl").read_text()
        for line in (six / f"{split}.jsonl").read_text().splitlines():
            image = json.loads(line)["image"]
            assert (eight / image).read_bytes() == (six / image).read_bytes(), image
    train = [json.loads(line) for line in (eight / "train.jsonl").read_text().splitlines()]
    assert sorted({int(Path(r["image"]).stem) for r in train}) == [0, 1, 2, 3, 6, 7]
    assert len(train) == 6 * len((six / "test.jsonl").read_text().splitlines())
