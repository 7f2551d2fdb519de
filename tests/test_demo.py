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
    assert summary["explain"]["generated"] + summary["explain"]["cached"] >= 6
    lines = [json.loads(line) for line in open(tmp_path / "explanations.jsonl")]
    assert any(line["explanation"] for line in lines)
    best = summary["match"]["results"][0]["matches"]
    assert len(best) == 4 and best == sorted(best, key=lambda m: -m["score"])
    assert Path(summary["plot"]).stat().st_size > 10_000       # a real PNG, not an empty file
    printed = capsys.readouterr().out
    assert "rsum" in printed and "val_recall.png" in printed
