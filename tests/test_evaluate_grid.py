"""`eclip evaluate` over several models and datasets: one table (CSV and JSON), each cell the same
report as one model on one dataset, features kept and reused with --embeddings; and the bad input
of --task classify / the table / --report, refused in one line before a model loads."""
import csv
import json
import subprocess
import sys

import pytest

from eclip.cli import app

from benchmark_fixtures import placeholder
from test_early_errors import RUNNER
from test_evaluate import runner


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """Two tables of pairs (12 and 8 records, distinct images), each with labels of 4 classes."""
    folder = tmp_path_factory.mktemp("grid")
    out = []
    for name, n, offset in (("news", 12, 0), ("other", 8, 20)):
        rows = []
        for i in range(n):
            placeholder(folder / f"{name}{i}.jpg", offset + i)
            rows.append({"id": f"{name}{i}", "image": f"{name}{i}.jpg", "text": f"{name} caption number {i}",
                         "label": "abcd"[i % 4]})
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out.append(path)
    return out


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, tiny_config_path):
    """Two tiny checkpoints with different random weights."""
    import torch

    from eclip.checkpoint import save_checkpoint
    from eclip.config import ExpertConfig
    from eclip.model.factory import load_model
    folder = tmp_path_factory.mktemp("ckpts")
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = load_model(model=str(tiny_config_path), pretrained="none", device="cpu", seed=seed,
                           experts=ExpertConfig(enabled=False))
        save_checkpoint(model, folder / f"m{seed}.safetensors")
        paths.append(folder / f"m{seed}.safetensors")
    return paths


def test_two_models_two_datasets_one_table(two_sets, two_checkpoints, tmp_path, monkeypatch):
    (news, other), (a, b) = two_sets, two_checkpoints
    args = ["evaluate", "--checkpoint", str(a), "--checkpoint", str(b), "--dataset", str(news), "--dataset",
            str(other), "--device", "cpu", "--same-image", "none", "--embeddings", str(tmp_path / "cells")]
    r = runner().invoke(app, [*args, "--output", str(tmp_path / "t.csv")])
    assert r.exit_code == 0, r.output
    assert "news.jsonl" in r.stdout and "other.jsonl" in r.stdout and "m1.safetensors" in r.stdout
    rows = list(csv.reader((tmp_path / "t.csv").open()))
    assert rows[0][0] == "model" and rows[0][1] == "news.jsonl t2i_R@1" and len(rows[0]) == 1 + 2 * 7
    assert [row[0] for row in rows[1:]] == [str(a), str(b)]

    grid = json.loads(runner().invoke(app, [*args, "--json"]).stdout)
    assert grid["models"] == [str(a), str(b)] and grid["datasets"] == ["news.jsonl", "other.jsonl"]
    for m, ckpt in enumerate((a, b)):                    # each cell is what one evaluation reports
        for d, table in enumerate((news, other)):
            one = runner().invoke(app, ["evaluate", "--checkpoint", str(ckpt), "--dataset", str(table),
                                        "--device", "cpu", "--same-image", "none", "--json"])
            single = json.loads(one.stdout)
            cell = grid["results"][m][d]
            assert cell["text_to_image"] == single["text_to_image"] and cell["rsum"] == single["rsum"]
            assert float(rows[1 + m][1 + 7 * d]) == pytest.approx(single["text_to_image"]["R@1"])
    assert grid["results"][0][0]["n_texts"] == 12 and grid["results"][0][1]["n_texts"] == 8

    # the kept features are reused: a third run embeds no image at all, and reports the same
    import eclip.evaluate

    def no_embedding(*a, **k):
        raise AssertionError("embedded again although the features were kept")
    monkeypatch.setattr(eclip.evaluate, "embed_images", no_embedding)
    again = runner().invoke(app, [*args, "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["results"] == grid["results"]


def test_classification_table_with_a_zero_shot_baseline_row(two_sets, two_checkpoints, tiny_config_path, tmp_path):
    (news, other), (a, _) = two_sets, two_checkpoints
    out = tmp_path / "t.json"
    r = runner().invoke(app, ["evaluate", "--task", "classify", "--checkpoint", str(a), "--model",
                              str(tiny_config_path), "--pretrained", "none", "--dataset", str(news), "--dataset",
                              str(other), "--device", "cpu", "--output", str(out)])
    assert r.exit_code == 0, r.output
    grid = json.loads(out.read_text())
    assert grid["task"] == "classify" and grid["columns"] == ["top1", "top5", "mean_per_class_recall"]
    assert grid["models"] == [str(a), f"{tiny_config_path} (none)"]
    assert all(cell["n"] == n for row in grid["results"] for cell, n in zip(row, (12, 8)))


def test_bad_input_exits_2_in_one_line_before_a_model_loads(two_sets, two_checkpoints, tmp_path, real_images):
    news = str(two_sets[0])
    a = str(two_checkpoints[0])
    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text(json.dumps({"image": str(real_images["astronaut"]), "text": "an astronaut"}) + "\n")
    no_c = tmp_path / "templates.txt"
    no_c.write_text("a photo of {c}.\na photo of a thing.\n")
    extra = tmp_path / "classes.txt"
    extra.write_text("a\nb\nc\nd\ne\n")
    full = tmp_path / "full"
    full.mkdir()
    (full / "old.html").write_text("x")
    classify = ["evaluate", "--task", "classify", "--checkpoint", a]
    cases = [
        ([*classify, "--dataset", str(unlabelled)], "1 of 1 records have no label"),
        ([*classify, "--dataset", news, "--classes", str(extra)], "class 'e' has no examples"),
        ([*classify, "--dataset", news, "--templates", str(no_c)], "has no {c} where the class name goes"),
        ([*classify, "--dataset", news, "--mode", "linear-probe"], "a file has no train / val split"),
        ([*classify, "--dataset", news, "--mode", "few-shot"], "--mode few-shot: one of zero-shot, linear-probe"),
        (["evaluate", "--dataset", news, "--checkpoint", a, "--checkpoint", a], "listed twice"),
        (["evaluate", "--dataset", news, "--dataset", news, "--checkpoint", a], "listed twice"),
        (["evaluate", "--dataset", news, "--checkpoint", a, "--report", str(full)], "exists and is not empty"),
        (["evaluate", "--dataset", news, "--checkpoint", a, "--task", "caption"], "--task caption: one of"),
    ]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "ECLIP_QUIET": "1", "ECLIP_CACHE": str(tmp_path / "cache"), "PYTHONPATH": ":".join(sys.path)}
    done = subprocess.run([sys.executable, "-c", RUNNER, json.dumps([c[0] for c in cases])], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    for (args, message), got in zip(cases, json.loads(done.stdout)):
        assert got["code"] == 2, (args, got)
        assert got["stderr"].startswith("eclip: error: ") and got["stderr"].count("\n") == 1, (args, got)
        assert message in got["stderr"], (args, got)
