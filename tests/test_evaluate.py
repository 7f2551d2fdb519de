"""`eclip evaluate` end to end on a tiny random-weight model and real photographs, and the
report built from features with known answers (entity breakdown, rank dump)."""
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from eclip.cli import app
from eclip.evaluate import evaluate_features, parse_recall_k
from eclip.errors import EclipError


def runner():
    try:
        return CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        return CliRunner()                  # click >= 8.2 keeps stderr apart by itself


@pytest.fixture
def dataset(tmp_path, real_images):
    """8 records: one photo under two names (identical bytes), one path used twice,
    one file that is not an image and one missing file."""
    folder = tmp_path / "data"
    folder.mkdir()
    for name, path in real_images.items():
        shutil.copy(path, folder / f"{name}.jpg")
    shutil.copy(real_images["astronaut"], folder / "astronaut_copy.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    person = [{"text": "Eileen Collins", "type": "PERSON"}]
    rows = [
        {"id": "a1", "image": "astronaut.jpg", "text": "Astronaut Eileen Collins in her NASA portrait",
         "entities": person},
        {"id": "a2", "image": "astronaut_copy.jpg", "text": "Eileen Collins, the first woman to pilot a shuttle",
         "entities": person + [{"text": "NASA", "type": "ORG"}]},
        {"id": "r1", "image": "rocket.jpg", "text": "DSCOVR launches on a SpaceX Falcon 9",
         "entities": [{"text": "SpaceX", "type": "ORG"}]},
        {"id": "r2", "image": "rocket.jpg", "text": "A Falcon 9 rocket on the pad at Cape Canaveral"},
        {"id": "c1", "image": "coffee.jpg", "text": "A cup of coffee on a saucer"},
        {"id": "k1", "image": "chelsea.jpg", "text": "Chelsea the cat"},
        {"id": "b1", "image": "broken.jpg", "text": "This picture cannot be read"},
        {"id": "m1", "image": "missing.jpg", "text": "This picture was never downloaded"},
    ]
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_json_report_dedupes_identical_files_and_skips_bad_images(dataset, tiny_config_path, tmp_path):
    out_file, dump = tmp_path / "report.json", tmp_path / "ranks.jsonl"
    r = runner().invoke(app, ["evaluate", "--dataset", str(dataset), "--model", str(tiny_config_path),
                              "--pretrained", "none", "--device", "cpu", "--batch-size", "3", "--json",
                              "--output", str(out_file), "--dump-ranks", str(dump)])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert json.loads(out_file.read_text()) == report
    # astronaut.jpg and astronaut_copy.jpg are one gallery item; rocket.jpg is used twice
    assert report["n_images"] == 4 and report["n_texts"] == 6 and report["n_skipped"] == 2
    assert report["checkpoint_sha256"] is None and report["model"]
    for direction in ("text_to_image", "image_to_text"):
        m = report[direction]
        assert set(m) == {"R@1", "R@5", "R@10", "median_rank", "mean_rank"}
        assert all(0 <= m[k] <= 100 for k in ("R@1", "R@5"))
        assert m["R@10"] == 100.0                  # galleries of 4 images and 6 captions
        assert 1 <= m["median_rank"] <= 6 and 1 <= m["mean_rank"] <= 6
    assert report["rsum"] == pytest.approx(sum(report[d][k] for d in ("text_to_image", "image_to_text")
                                                for k in ("R@1", "R@5", "R@10")))
    by = report["by_entity_type"]
    assert by["PERSON"]["n"] == 2 and by["PERSON"]["n_images"] == 1
    assert by["ORG"]["n"] == 2 and by["ORG"]["n_images"] == 2
    assert by["PERSON"]["text_to_image_R@1"] in (0.0, 50.0, 100.0)

    lines = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(lines) == 6 + 4
    captions = {d["query"]: d for d in lines if d["direction"] == "text_to_image"}
    images = {d["query"]: d for d in lines if d["direction"] == "image_to_text"}
    assert set(captions) == {"a1", "a2", "r1", "r2", "c1", "k1"}
    astronaut = next(d for q, d in images.items() if q.endswith("astronaut.jpg"))
    assert sorted(astronaut["positives"]) == ["a1", "a2"]
    assert captions["a2"]["positives"] == [astronaut["query"]]   # the copy maps to the one gallery item
    for d in lines:
        scores = [t["score"] for t in d["top"]]
        assert scores == sorted(scores, reverse=True)
        assert len(d["top"]) == (4 if d["direction"] == "text_to_image" else 6)
        # the rank agrees with the top list: the first positive's place, or later among equal scores
        first = next(i for i, t in enumerate(d["top"], 1) if t["id"] in d["positives"])
        assert first == d["rank"] or (first < d["rank"] and abs(scores[first - 1] - scores[d["rank"] - 1]) < 2e-6)


def test_cli_prints_a_table_by_default(dataset, tiny_config_path):
    r = runner().invoke(app, ["evaluate", "--dataset", str(dataset), "--model", str(tiny_config_path),
                              "--pretrained", "none", "--device", "cpu", "--recall-k", "1,3"])
    assert r.exit_code == 0, r.output
    assert "text -> image" in r.stdout and "image -> text" in r.stdout
    assert "R@3" in r.stdout and "R@5" not in r.stdout and "rsum" in r.stdout


@pytest.mark.parametrize("args,message", [
    (["--recall-k", "0,5"], "--recall-k"),
    (["--recall-k", "one"], "--recall-k"),
    ([], "--dataset is required"),
])
def test_cli_bad_input_exits_2_with_one_line(args, message):
    r = runner().invoke(app, ["evaluate", *args])
    assert r.exit_code == 2
    assert r.stderr.startswith("eclip: error: ") and message in r.stderr and r.stderr.count("\n") == 1


def test_cli_embeddings_needs_the_embed_store(tmp_path):
    r = runner().invoke(app, ["evaluate", "--embeddings", str(tmp_path)])
    assert r.exit_code == 2
    try:
        import eclip.embedstore  # noqa: F401
    except ImportError:
        assert "--embeddings needs eclip embed's store" in r.stderr


def test_parse_recall_k():
    assert parse_recall_k("10,1,5") == (1, 5, 10)
    with pytest.raises(EclipError):
        parse_recall_k("")


def test_report_from_features_breaks_recall_down_by_entity_type(tmp_path):
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0],      # t0 -> image 0: hit
                          [0.8, 0.6],      # t1 -> image 1, but image 0 scores higher: rank 2
                          [0.0, 1.0]])     # t2 -> image 1: hit
    dump = tmp_path / "ranks.jsonl"
    report = evaluate_features(texts, images, [0, 1, 1], recall_k=(1, 2), dump_ranks=dump,
                               text_ids=["t0", "t1", "t2"], image_ids=["img0", "img1"],
                               text_entity_types=[["PERSON"], ["GPE", "PERSON"], ["GPE"]])
    assert report["text_to_image"]["R@1"] == pytest.approx(200 / 3)
    assert report["image_to_text"]["R@1"] == 100.0     # image 1's best caption t2 ranks first
    assert report["by_entity_type"] == {
        "GPE": {"text_to_image_R@1": 50.0, "image_to_text_R@1": 100.0, "n": 2, "n_images": 1},
        "PERSON": {"text_to_image_R@1": 50.0, "image_to_text_R@1": 100.0, "n": 2, "n_images": 2},
    }
    lines = [json.loads(line) for line in dump.read_text().splitlines()]
    t1 = next(d for d in lines if d["query"] == "t1")
    assert t1 == {"direction": "text_to_image", "query": "t1", "rank": 2, "positives": ["img1"],
                  "top": [{"id": "img0", "score": 0.8}, {"id": "img1", "score": 0.6}]}
    img1 = next(d for d in lines if d["query"] == "img1")
    assert img1["rank"] == 1 and img1["positives"] == ["t1", "t2"] and img1["top"][0]["id"] == "t2"


def test_no_entity_types_no_breakdown():
    report = evaluate_features(torch.eye(2), torch.eye(2), [0, 1])
    assert "by_entity_type" not in report and report["rsum"] == 600.0


def test_report_names_what_was_evaluated_from_any_folder(dataset, checkpoint, monkeypatch):
    """A table file has no split, relative paths are reported absolute, and a checkpoint is named
    by its path (in the JSON and the table title), not by a generated architecture name."""
    monkeypatch.chdir(dataset.parent)
    ckpt = checkpoint[0]
    r = runner().invoke(app, ["evaluate", "--dataset", dataset.name, "--checkpoint", str(ckpt), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["split"] is None and report["dataset"] == str(dataset)
    assert report["checkpoint"] == str(ckpt) and report["checkpoint_sha256"]
    table = runner().invoke(app, ["evaluate", "--dataset", dataset.name, "--checkpoint", str(ckpt)])
    title = table.stdout.splitlines()[0]
    assert str(ckpt) in title and "/ test" not in title and "eclip-" not in title, table.stdout


def test_report_gives_a_model_config_file_as_an_absolute_path(dataset, tiny_config_path, monkeypatch):
    monkeypatch.chdir(tiny_config_path.parent)
    r = runner().invoke(app, ["evaluate", "--dataset", str(dataset), "--model", tiny_config_path.name,
                              "--pretrained", "none", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["model"] == str(tiny_config_path) and report["checkpoint"] is None
