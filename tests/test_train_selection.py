"""`eclip train --select-by val-loss` (the reference's rule) and captions standing in for missing
explanations: both said at start, logged and recorded."""
import json

import pytest
import torch
from open_clip.loss import ClipLoss
from safetensors import safe_open
from typer.testing import CliRunner

from eclip.cli import app
from eclip.train.validate import contrastive_loss

from train_helpers import build_flags, log_lines, one_thread_run, same_last_weights, train_args


def runner():
    try:
        return CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        return CliRunner()                  # click >= 8.2 keeps stderr apart by itself


def test_validation_loss_is_clips_loss_averaged_over_chunks():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(10, 16), dim=-1)
    txt = torch.nn.functional.normalize(img + 0.5 * torch.randn(10, 16), dim=-1)
    clip_loss, scale = ClipLoss(), 30.0
    assert contrastive_loss(img, txt, scale, chunk=10) == pytest.approx(float(clip_loss(img, txt, scale)), rel=1e-6)
    halves = [float(clip_loss(img[s:s + 6], txt[s:s + 6], scale)) for s in (0, 6)]   # chunks of 6 and 4
    assert contrastive_loss(img, txt, scale, chunk=6) == pytest.approx(sum(halves) / 2, rel=1e-6)


def test_select_by_val_loss_and_captions_as_explanations_announced(tmp_path, monkeypatch):
    monkeypatch.delenv("ECLIP_QUIET", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    flags = build_flags(tmp_path)
    rows = [json.loads(x) for x in (flags / "set/train.jsonl").read_text().splitlines()]
    cache = tmp_path / "explanations.jsonl"
    explained = {r["text"] for r in rows[:30]}
    cache.write_text("".join(json.dumps({"id": None, "caption": c, "explanation": f"About: {c}", "model": "m",
                                         "prompt_sha256": "p", "error": None}) + "\n" for c in sorted(explained)))
    fallback = sum(1 for r in rows if r["text"] not in explained)
    assert 0 < fallback < len(rows)
    run = tmp_path / "run"
    try:
        result = runner().invoke(app, train_args(flags, run, "--select-by", "val-loss", "--eval-every", "2",
                                                    "--explanations", str(cache), "--json"))
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, (result.output, result.exception)
    summary = json.loads(result.stdout)
    err = " ".join(result.stderr.split())                          # rich wraps lines at the terminal width
    assert f"{fallback} of {len(rows)} training pairs have no explanation" in err

    config = json.loads((run / "config.json").read_text())
    assert config["captions_as_explanations"] == summary["captions_as_explanations"] == fallback
    assert config["train_pairs"] == summary["train_pairs"] == len(rows) and config["select_by"] == "val-loss"

    val = [r for r in log_lines(run) if r["kind"] == "val"]
    assert len(val) == 4 and all("val_loss" in r and "rsum" in r for r in val)
    assert err.count("val loss ") == 4
    best = min(val, key=lambda r: r["val_loss"])                 # the first of equals (min is stable)
    assert (summary["best_step"], summary["best_val_loss"], summary["best_val_rsum"]) == (
        best["step"], best["val_loss"], best["rsum"])
    with safe_open(str(run / "best.safetensors"), "pt") as f:
        meta = f.metadata()
    assert int(meta["step"]) == best["step"] and meta["select_by"] == "val-loss"


def test_select_by_is_checked_before_anything_loads(tmp_path):
    result = CliRunner().invoke(app, ["train", "--dataset", "x.jsonl", "--select-by", "recall", "--output",
                                      str(tmp_path / "run")])
    assert result.exit_code == 2 and "--select-by recall: one of rsum, val-loss" in result.output


@pytest.mark.parametrize("workers", ["0", "1"])
def test_val_frequency_validates_every_kth_epoch_and_changes_no_weight(tmp_path, workers):
    """--val-frequency 2 over 3 epochs validates after epochs 2 and 3 only, and the weights are those
    of a run validating every epoch: validation must not touch the training's random state (with
    --workers 0 the augmentations read torch's global generator, which a DataLoader draws its seed from
    unless given its own)."""
    flags = build_flags(tmp_path)
    runs = {}
    for k in (1, 2):
        runs[k] = tmp_path / f"every-{k}"
        one_thread_run(train_args(flags, runs[k], "--epochs", "3", "--workers", workers, "--augment",
                                  "--val-frequency", str(k)))
    assert [r["epoch"] for r in log_lines(runs[1]) if r["kind"] == "val"] == [1, 2, 3]
    assert [r["epoch"] for r in log_lines(runs[2]) if r["kind"] == "val"] == [2, 3]
    assert same_last_weights(runs[1], runs[2])


def test_save_frequency_saves_every_kth_epoch_and_the_last_and_changes_no_weight(tmp_path, monkeypatch):
    """--save-frequency 2 over 3 epochs saves the state (and last.safetensors) after epochs 2 and 3
    only; the weights are those of a run saving every epoch, and the run resumes from its last save."""
    from eclip.train.rundir import RunDir
    flags = build_flags(tmp_path)
    saved, save_state = [], RunDir.save_state
    monkeypatch.setattr(RunDir, "save_state", lambda self, acc, t: saved.append(t["epoch"]) or save_state(self, acc, t))
    runs = {}
    for k in (1, 2):
        saved.clear()
        runs[k] = tmp_path / f"every-{k}"
        one_thread_run(train_args(flags, runs[k], "--epochs", "3", "--save-frequency", str(k)))
        assert saved == ([1, 2, 3] if k == 1 else [2, 3])
    assert same_last_weights(runs[1], runs[2])
    saved.clear()
    summary = one_thread_run(["train", "--resume", str(runs[2]), "--epochs", "4"])     # 3 saved: one more epoch
    assert saved == [4] and summary["steps"] == 16
