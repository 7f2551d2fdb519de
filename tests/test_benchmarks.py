"""The benchmark readers on small copies of N24News, VisualNews and GoodNews in every layout they
read, and `eclip evaluate` end to end on each."""
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from benchmark_fixtures import (GOODNEWS, N24NEWS, VISUALNEWS, goodnews_authors, goodnews_release, n24news_archive,
                                n24news_build, visualnews, write_json)
from eclip.cli import app
from eclip.data.readers import read_dataset
from eclip.errors import EclipError


def ids(records):
    return [r.id for r in records]


# --- N24News -------------------------------------------------------------------------------

def test_n24news_archive(tmp_path):
    root = n24news_archive(tmp_path / "n24")
    train = read_dataset("n24news", root, "train")
    assert ids(train) == ["img1", "img2"]
    assert train[0].caption == "Eileen Collins aboard the shuttle."     # the caption, not the headline
    assert train[0].image == str(root.resolve() / "imgs/img1.jpg")
    assert ids(read_dataset("n24news", root, "val")) == ids(read_dataset("N24News", root, "dev")) == ["img3"]


def test_n24news_split_files_with_the_build_outputs_images(tmp_path):
    root = n24news_archive(tmp_path / "n24", folder="images")
    assert read_dataset("n24news", root, "test")[3].image == str(root.resolve() / "images/img4.jpg")


def test_n24news_build_output_has_no_split_and_says_what_is_missing(tmp_path):
    root = n24news_build(tmp_path / "n24")
    assert ids(read_dataset("n24news", root, "all")) == [d["image_id"] for d in N24NEWS]
    with pytest.raises(EclipError) as info:
        read_dataset("n24news", root, "test")
    message = str(info.value)
    assert "no train/dev/test split" in message and "news/nytimes_test.json is not there" in message
    assert "--split all" in message and "\n" not in message


def test_n24news_pairs_without_caption_are_left_out(tmp_path):
    root = n24news_archive(tmp_path)
    write_json(root / "news/nytimes_test.json", [N24NEWS[0], {**N24NEWS[1], "caption": None}])
    assert ids(read_dataset("n24news", root, "test")) == ["img1"]


# --- VisualNews ----------------------------------------------------------------------------

@pytest.mark.parametrize("layout, base", [("authors", "images/"), ("beside", "origin/"), ("flat", "")])
def test_visualnews_split_files(tmp_path, layout, base):
    root = visualnews(tmp_path / "vn", layout)
    test = read_dataset("visualnews", root, "test")
    assert [(r.id, r.caption) for r in test] == [(str(d["id"]), d["caption"]) for d in VISUALNEWS]
    assert test[3].image == str(root.resolve() / f"{base}bbc/images/0537/663.jpg")
    assert all(Path(r.image).is_file() for r in test)
    assert ids(read_dataset("visualnews", root, "dev")) == ["596887"]


def test_visualnews_release_has_no_split(tmp_path):
    root = visualnews(tmp_path / "vn", "release")
    records = read_dataset("visualnews", root, "all")
    assert ids(records) == [str(d["id"]) for d in VISUALNEWS] and all(Path(r.image).is_file() for r in records)
    with pytest.raises(EclipError) as info:
        read_dataset("visualnews", root, "train")
    assert "has no train/val/test split" in str(info.value) and "--split all" in str(info.value)
    # the release folder itself as the data root
    assert ids(read_dataset("visualnews", root / "origin", "all")) == ids(records)


def test_visualnews_image_path_may_not_leave_its_folder(tmp_path):
    root = visualnews(tmp_path / "vn", "flat")
    for bad in ("../../etc/passwd", "/etc/passwd"):
        write_json(root / "test.json", [{**VISUALNEWS[0], "image_path": bad}])
        with pytest.raises(EclipError, match="leaves") as info:
            read_dataset("visualnews", root, "test")
        assert "test.json" in str(info.value) and bad in str(info.value)


# --- GoodNews ------------------------------------------------------------------------------

@pytest.mark.parametrize("captions", ["data/captioning_dataset.json", "captioning_dataset.json",
                                      "data/article+caption.json", "article_caption.json"])
def test_goodnews_release_under_each_name(tmp_path, captions):
    root = goodnews_release(tmp_path / "gn", captions)
    assert {(r.id, r.caption) for r in read_dataset("goodnews", root, "test")} == {
        ("5a1b_1", GOODNEWS["5a1b"]["1"]), ("6c2d_0", GOODNEWS["6c2d"]["0"])}
    train = read_dataset("goodnews", root, "train")
    assert ids(train) == ["5a1b_0"] and train[0].image == str(root.resolve() / "images/5a1b_0.jpg")


def test_goodnews_prefers_the_originals_and_reads_resized_only_when_asked(tmp_path):
    root = goodnews_release(tmp_path / "gn", folders=("images", "resized"))
    assert all("/images/" in r.image for r in read_dataset("goodnews", root, "test"))
    resized = read_dataset("goodnews", root, "test", image_folder="resized")
    assert all(r.image.endswith(f"/resized/{r.id}.jpg") for r in resized)

    only_resized = goodnews_release(tmp_path / "gn2", folders=("resized",))
    with pytest.raises(EclipError, match="image folder not found.*pass --image-folder resized"):
        read_dataset("goodnews", only_resized, "test")
    with pytest.raises(EclipError, match="--image-folder thumbs"):
        read_dataset("goodnews", root, "test", image_folder="thumbs")


def test_goodnews_missing_images_are_counted_and_named_never_filled_from_resized(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ECLIP_QUIET", raising=False)
    root = goodnews_release(tmp_path / "gn", folders=("images", "resized"))
    (root / "images/6c2d_0.jpg").unlink()
    records = read_dataset("goodnews", root, "test")
    assert {r.image for r in records} == {str(root.resolve() / "images/5a1b_1.jpg"),
                                          str(root.resolve() / "images/6c2d_0.jpg")}   # no mix
    err = capsys.readouterr().err
    assert "1 of 2 test images are missing from images/" in err and "6c2d_0.jpg" in err
    assert "resized/ has 1 of them" in err and "--image-folder resized" in err


def test_goodnews_authors_split_files(tmp_path):
    root = goodnews_authors(tmp_path / "gn")
    test = read_dataset("goodnews", root, "test")
    assert ids(test) == ["5a1b_0", "5a1b_1", "6c2d_0"]                  # 6c2d_1 is in broken_images.txt
    assert test[0].caption == "Barack Obama in Chicago."                 # \r\n -> space, \r dropped
    assert test[2].image == str(root.resolve() / "images/6c2d_0.jpg")
    assert ids(read_dataset("goodnews", root, "val")) == ["6c2d_0"]


def test_goodnews_split_files_win_and_no_layout_lists_every_layout(tmp_path):
    root = goodnews_release(tmp_path / "gn")
    (root / "data/img_splits.json").unlink()
    with pytest.raises(EclipError) as info:
        read_dataset("goodnews", root, "test")
    message = str(info.value)
    assert "no GoodNews layout found for split 'test'" in message and "\n" not in message
    for looked in ("new_goodnews_capim_{train,val,test}.json", "broken_images.txt", "captioning_dataset.json",
                   "article+caption.json", "article_caption.json", "img_splits.json"):
        assert looked in message


@pytest.mark.parametrize("name, layouts", [
    ("n24news", ["news/nytimes_{train,dev,test}.json", "imgs/", "images/", "nytimes_dataset.json"]),
    ("visualnews", ["images/<image_path>", "origin/<image_path>", "origin/data.json", "relative to the data root"]),
])
def test_no_layout_lists_every_layout_in_one_line(tmp_path, name, layouts):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EclipError) as info:
        read_dataset(name, tmp_path / "empty", "test")
    message = str(info.value)
    assert "no " in message and "layout found" in message and "\n" not in message
    assert all(text in message for text in layouts), message


@pytest.mark.parametrize("name", ["n24news", "visualnews", "goodnews"])
def test_missing_data_root_names_path(tmp_path, name):
    with pytest.raises(EclipError, match="data root not found") as info:
        read_dataset(name, tmp_path / "absent", "train")
    assert str(tmp_path / "absent") in str(info.value) and "\n" not in str(info.value)


def test_unknown_split_and_dataset(tmp_path):
    with pytest.raises(EclipError, match="unknown split 'valid'"):
        read_dataset("visualnews", visualnews(tmp_path, "flat"), "valid")
    with pytest.raises(EclipError, match="neither a benchmark"):
        read_dataset("coco", None, "train")


def test_invalid_json_wrong_structure_and_duplicate_ids(tmp_path):
    root = visualnews(tmp_path, "flat")
    (root / "train.json").write_text('[{"id": 1,\n "caption": "x"\n "image_path": "a.jpg"}]')
    with pytest.raises(EclipError, match=r"train.json line 3: invalid JSON"):
        read_dataset("visualnews", root, "train")
    write_json(root / "train.json", {"id": 1})
    with pytest.raises(EclipError, match="expected a JSON list"):
        read_dataset("visualnews", root, "train")
    write_json(root / "train.json", [{"id": 1, "caption": "x"}])
    with pytest.raises(EclipError, match="record 0 lacks 'image_path'"):
        read_dataset("visualnews", root, "train")



def test_a_benchmarks_duplicate_ids_are_kept_numbered_and_counted(tmp_path, capsys, monkeypatch):
    """The reference reads a repeated id as another pair; eclip keeps it too, under a new id (id-keyed
    outputs would merge the two), and says so. A user's own file still refuses them (test_dataset)."""
    monkeypatch.delenv("ECLIP_QUIET", raising=False)
    root = visualnews(tmp_path, "flat")
    write_json(root / "val.json", [{"id": 1, "caption": "a", "image_path": "./a.jpg"},
                                   {"id": 1, "caption": "b", "image_path": "./b.jpg"},
                                   {"id": 1, "caption": "c", "image_path": "./c.jpg"}])
    records = read_dataset("visualnews", root, "val")
    assert ids(records) == ["1", "1#2", "1#3"] and [r.caption for r in records] == ["a", "b", "c"]
    assert "2 records repeat an earlier record's id (first: '1')" in capsys.readouterr().err
    table = tmp_path / "pairs.jsonl"
    table.write_text('{"id": 1, "image": "a.jpg", "text": "a"}\n{"id": 1, "image": "b.jpg", "text": "b"}\n')
    with pytest.raises(EclipError, match="duplicate id '1'"):
        read_dataset(str(table))


# --- --protocol paper: the reference's readers ------------------------------------------------

def test_paper_protocol_reads_goodnews_test_with_its_broken_images(tmp_path):
    root = goodnews_authors(tmp_path / "gn")
    assert ids(read_dataset("goodnews", root, "test", protocol="paper")) == ["5a1b_0", "5a1b_1", "6c2d_0", "6c2d_1"]
    assert ids(read_dataset("goodnews", root, "test")) == ["5a1b_0", "5a1b_1", "6c2d_0"]
    # train and val leave broken images out under both protocols, as the reference's training reader
    assert ids(read_dataset("goodnews", root, "val", protocol="paper")) == ["6c2d_0"]


def test_paper_protocol_keeps_empty_captions(tmp_path):
    root = n24news_archive(tmp_path)
    write_json(root / "news/nytimes_test.json", [N24NEWS[0], {**N24NEWS[1], "caption": ""},
                                                 {**N24NEWS[2], "caption": None}])
    assert ids(read_dataset("n24news", root, "test")) == ["img1"]
    assert ids(read_dataset("n24news", root, "test", protocol="paper")) == ["img1", "img2"]   # null: unreadable


def test_paper_protocol_leaves_unexplained_goodnews_train_and_val_pairs_out(tmp_path):
    root = goodnews_authors(tmp_path / "gn")
    write_json(root / "val_cap.json", {"5a1b_1.jpg": "Michelle Obama, First Lady."})   # the authors' file
    write_json(root / "new_goodnews_capim_val.json", [
        {"image_id": "5a1b_1.jpg", "captioning": "Michelle Obama at the White House.", "title": "t"},
        {"image_id": "6c2d_0.jpg", "captioning": "Angela Merkel in Berlin.", "title": "t"}])
    explanations = root / "val_cap.json"
    paper = read_dataset("goodnews", root, "val", explanations, protocol="paper")
    assert ids(paper) == ["5a1b_1"] and paper[0].explanation == "Michelle Obama, First Lady."
    assert ids(read_dataset("goodnews", root, "val", explanations)) == ["5a1b_1", "6c2d_0"]   # eclip keeps them
    assert ids(read_dataset("goodnews", root, "test", explanations, protocol="paper"))[-1] == "6c2d_1"  # test: all


# --- end to end: `eclip evaluate` on every layout --------------------------------------------

LAYOUTS = [
    ("n24news", lambda p: n24news_archive(p), "test", [], 4),
    ("n24news", lambda p: n24news_archive(p, folder="images"), "test", [], 4),
    ("n24news", lambda p: n24news_build(p), "all", [], 4),
    ("visualnews", lambda p: visualnews(p, "authors"), "test", [], 4),
    ("visualnews", lambda p: visualnews(p, "beside"), "test", [], 4),
    ("visualnews", lambda p: visualnews(p, "flat"), "test", [], 4),
    ("visualnews", lambda p: visualnews(p, "release"), "all", [], 4),
    ("goodnews", lambda p: goodnews_release(p), "test", [], 2),
    ("goodnews", lambda p: goodnews_release(p, "article+caption.json", folders=("resized",)), "test",
     ["--image-folder", "resized"], 2),
    ("goodnews", lambda p: goodnews_authors(p), "test", [], 3),
]


@pytest.mark.parametrize("dataset, build, split, extra, n", LAYOUTS,
                         ids=[f"{d}-{i}" for i, (d, *_) in enumerate(LAYOUTS)])
def test_evaluate_reads_every_layout_end_to_end(tmp_path, checkpoint, dataset, build, split, extra, n):
    root = build(tmp_path / "data")
    result = CliRunner().invoke(app, ["evaluate", "--dataset", dataset, "--data-root", str(root), "--split", split,
                                      "--checkpoint", str(checkpoint[0]), "--device", "cpu", "--json", *extra])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n_texts"] == report["n_images"] == n and report["n_skipped"] == 0
    assert 0 <= report["rsum"] <= 600


def test_evaluate_under_the_paper_protocol(tmp_path, checkpoint, monkeypatch):
    monkeypatch.delenv("ECLIP_QUIET", raising=False)
    root = goodnews_authors(tmp_path / "gn")
    args = ["evaluate", "--dataset", "goodnews", "--data-root", str(root), "--checkpoint", str(checkpoint[0]),
            "--device", "cpu", "--json"]
    try:
        runner = CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        runner = CliRunner()                  # click >= 8.2 keeps stderr apart by itself
    paper = runner.invoke(app, [*args, "--protocol", "paper"])
    assert paper.exit_code == 0, paper.output
    report = json.loads(paper.stdout)
    assert report["n_texts"] == report["n_images"] == 4 and report["same_image"] == "none"   # broken image kept
    assert "evaluating in fp32" in paper.stderr           # the CPU: fp32, as the reference's eval.py on a CPU
    eclip = json.loads(runner.invoke(app, args).stdout)
    assert eclip["n_texts"] == 3 and eclip["same_image"] == "bytes"


def test_an_option_contradicting_the_protocol_is_refused_before_anything_loads(tmp_path):
    result = CliRunner().invoke(app, ["evaluate", "--dataset", "goodnews", "--protocol", "paper",
                                      "--same-image", "path"])
    assert result.exit_code == 2 and "--same-image path: --protocol paper sets --same-image none" in result.output
    result = CliRunner().invoke(app, ["train", "--dataset", "x.jsonl", "--protocol", "paper", "--negatives",
                                      "softmax", "--output", str(tmp_path / "run")])
    assert result.exit_code == 2 and "--protocol paper sets --negatives reference" in result.output
    result = CliRunner().invoke(app, ["train", "--dataset", "x.jsonl", "--protocol", "papers",
                                      "--output", str(tmp_path / "run")])
    assert result.exit_code == 2 and "--protocol papers: one of eclip, paper" in result.output
