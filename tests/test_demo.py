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
