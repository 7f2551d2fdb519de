"""The README's main job, shortened: the whole chain on real entity data, offline, end to end."""
import json
import runpy
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


@pytest.mark.slow
def test_quick_demo_runs_the_whole_chain(tmp_path, capsys):
    main = runpy.run_path(str(DEMO))["main"]
    assert main(["--quick", "--output", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["results"]) == {"untrained (random init)", "EntityCLIP", "CLIP fine-tuned (--no-experts)"}
    for result in summary["results"].values():
        assert 0 <= result["text_to_image"]["R@1"] <= 100 and result["n_images"] == 20
    # both models trained by `eclip train` processes, the same steps each, evaluated on their last checkpoint
    n_train = len((tmp_path / "data" / "train.jsonl").read_text().splitlines())
    for name, run in summary["train"].items():
        assert run["steps"] == 2 * (n_train // 16) and Path(run["last_checkpoint"]).is_file(), name
        assert (Path(run["run_dir"]).with_suffix(".log")).is_file()
    assert summary["explain"]["live"]["generated"] + summary["explain"]["live"]["cached"] == 1
    assert summary["explain"]["shipped_lines"] == 812
    lines = [json.loads(line) for line in open(tmp_path / "explanations-live.jsonl")]
    assert lines and all(line["explanation"] for line in lines)
    photos = summary["match"]["EntityCLIP"]["results"]
    assert len(photos) == 8 and all(1 <= p["rank"] <= 8 for p in photos)
    assert all(len(p["matches"]) == 8 and p["matches"] == sorted(p["matches"], key=lambda m: -m["score"])
               for p in photos)
    assert Path(summary["plot"]).stat().st_size > 10_000       # a real PNG, not an empty file
    classified = summary["classify"]["results"]
    assert set(classified) == set(summary["results"])
    assert all(r["n"] == 20 and r["n_classes"] == 20 and 0 <= r["top1"] <= r["top5"] <= 100 for r in classified.values())
    assert "Captions whose image ranked worst" in Path(summary["classify"]["report"]).read_text()
    printed = capsys.readouterr().out
    assert "rsum" in printed and "val_recall.png" in printed and "ranked first" in printed
    assert "seed spread" in printed          # --quick: no ablation for its settings, and the line says so

    # run again on the same folder: the finished runs are reused, not trained again
    stamp = {n: Path(r["last_checkpoint"]).stat().st_mtime_ns for n, r in summary["train"].items()}
    assert main(["--quick", "--output", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "summary.json").read_text())
    assert {n: Path(r["last_checkpoint"]).stat().st_mtime_ns for n, r in again["train"].items()} == stamp


def test_other_settings_start_again_from_fresh_data(tmp_path):
    """An output folder made with other settings (an earlier version's, or --quick) is not reused."""
    forget = runpy.run_path(str(DEMO))["forget_other_settings"]
    settings = {"views": 8, "epochs": 60}
    for name in ("data", "runs"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "kept.txt").write_text("x")
    forget(tmp_path, settings)                       # no record beside earlier output: made before settings.json
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "kept.txt").write_text("x")
    forget(tmp_path, settings)                       # the same settings: kept
    assert (tmp_path / "runs" / "kept.txt").is_file()
    (tmp_path / "results.jsonl").write_text("{}\n")
    forget(tmp_path, {**settings, "views": 6}, made=("data", "runs", "results.jsonl"))
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()
    assert not (tmp_path / "results.jsonl").exists()
    assert json.loads((tmp_path / "settings.json").read_text()) == {**settings, "views": 6}


def test_the_line_under_the_table_says_whether_this_runs_gap_is_inside_the_seed_spread(tmp_path):
    spread_module = runpy.run_path(str(DEMO.parent / "seed_spread.py"))
    settings = {"views": 8, "epochs": 60}
    rows = [{"row": row, "seed": seed, "t2i_r1": r1} for row, values in
            (("EntityCLIP (a) LLM explanations", (70.0, 58.6, 67.5)),
             ("CLIP fine-tuned (--no-experts)", (62.1, 41.9, 74.4)))
            for seed, r1 in zip((42, 43, 44), values)]
    path = tmp_path / "spread.json"
    assert spread_module["write_spread"](path, rows[:-1], settings, [42, 43, 44], "m") is None   # a seed missing
    assert not path.exists()
    spread_module["write_spread"](path, rows, settings, [42, 43, 44], "m")
    assert spread_module["read_spread"]({**settings, "epochs": 30}, path) is None     # other settings: not theirs
    spread = spread_module["read_spread"](settings, path)
    # per-seed gaps +7.9, +16.7, -6.9: mean +5.9, sd 11.9, so the band is -18.0 to +29.8
    lines = spread_module["spread_lines"]
    inside = lines({"EntityCLIP": 54.7, "CLIP fine-tuned (--no-experts)": 61.6}, spread)
    assert "-6.9 points, INSIDE" in inside[1] and "-18.0 to +29.8" in inside[1]
    assert "65.4 ± 6.0" in inside[0] and "One run (seed 42) on one machine" in inside[0]
    outside = lines({"EntityCLIP": 80.0, "CLIP fine-tuned (--no-experts)": 40.0}, spread)
    assert "+40.0 points, OUTSIDE" in outside[1]
    below = lines({"EntityCLIP": 40.0, "CLIP fine-tuned (--no-experts)": 60.0}, spread)
    assert "-20.0 points, OUTSIDE" in below[1]
    assert "no seed spread" in lines({"EntityCLIP": 1.0, "CLIP fine-tuned (--no-experts)": 2.0}, None)[0]


def test_free_form_queries_name_every_test_entity_once_in_words_no_caption_uses(tmp_path):
    """examples/free-form-queries.jsonl: one query per entity of the demo set, none equal to any caption
    of any split; free_form_split puts them in place of the test captions, keeping images and ids."""
    from eclip.data.demo_set import flag_entities, photo_entities
    demo = runpy.run_path(str(DEMO))
    queries = [json.loads(line) for line in demo["QUERIES"].read_text().splitlines()]
    entities = flag_entities() + photo_entities(include_optional=False)
    assert sorted(q["entity"] for q in queries) == sorted(e.slug for e in entities)
    captions = {c.lower() for e in entities for phrasings in e.captions.values() for c in phrasings}
    assert not [q["query"] for q in queries if q["query"].lower() in captions]
    assert {"entity": "flag-japan", "query": "Japan flag waving"} in queries

    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"id": "flag-japan-5", "image": "images/flag-japan/5.jpg", "text": "A photo of the flag "
                                "of Japan", "entities": [{"text": "Japan", "type": "GPE"}]}) + "\n")
    made = demo["free_form_split"](test, demo["QUERIES"])
    record = json.loads(made.read_text())
    assert record["text"] == "Japan flag waving" and record["image"] == "images/flag-japan/5.jpg"
    assert made.parent == test.parent                      # image paths stay relative to the same folder
