"""`eclip train`: resumable after SIGKILL, skips bad images, refuses to mix runs, leaves its files."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from eclip.cli import app

from train_helpers import build_flags, invoke, log_lines, one_thread_run, train_args

ROOT = Path(__file__).parent.parent


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from more threads, and lose much when the cores are shared;
    one thread also makes this process compute exactly what the subprocesses compute."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def flags(tmp_path_factory):
    """12 real flags, 6 views each: train.jsonl (48 pairs), val.jsonl (12), and the tiny model config."""
    return build_flags(tmp_path_factory.mktemp("flags"))


@pytest.fixture(scope="module")
def reference(flags, tmp_path_factory):
    """An uninterrupted run: 2 epochs of 4 steps. -> (run folder, summary)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    return run, one_thread_run(train_args(flags, run))


def complete_states(run):
    state = run / "state"
    return [p for p in state.iterdir() if re.fullmatch(r"step-\d+", p.name)] if state.is_dir() else []


def timeless(rows):
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "pairs_per_s")} for r in rows]


def kill_after_first_state(flags, run, *extra):
    """`eclip train` (2 epochs, a state every 2 steps) in a subprocess, SIGKILLed right after its first
    state save, mid-training; -> the finished process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ECLIP_QUIET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "eclip", *train_args(flags, run, "--save-every", "2", *extra)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not complete_states(run):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no state saved"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc


@pytest.mark.slow
def test_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path, flags, reference):
    (whole, summary), killed = reference, tmp_path / "killed"
    assert summary["steps"] == 8 and summary["best_val_rsum"] is not None

    proc = kill_after_first_state(flags, killed)
    assert proc.returncode == -signal.SIGKILL and not (killed / "summary.json").exists()
    saved_at = json.loads((complete_states(killed)[0] / "trainer.json").read_text())["step"]
    assert 2 <= saved_at < 8

    resumed = json.loads(invoke(["train", "--resume", str(killed), "--json"]).stdout)
    assert resumed["steps"] == 8 and resumed["best_val_rsum"] == summary["best_val_rsum"]
    a, b = load_file(whole / "last.safetensors"), load_file(killed / "last.safetensors")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed weights differ in {len(different)} tensors, e.g. {different[:3]}"
    # the log reads as one run: every step once, the same numbers
    assert timeless(log_lines(killed)) == timeless(log_lines(whole))
    assert len(complete_states(killed)) == 1 and not list((killed / "state").glob("*.tmp"))


@pytest.mark.slow
def test_run_killed_with_its_workers_alive_resumes_at_once(tmp_path, flags):
    """SIGKILL reaches the main process only; its data-loading workers notice a few seconds later.
    They never held the folder's lock, so `--resume` right away is not refused."""
    killed = tmp_path / "killed"
    kill_after_first_state(flags, killed, "--workers", "2")
    result = CliRunner().invoke(app, ["train", "--resume", str(killed), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == 8


@pytest.mark.slow
def test_unreadable_images_are_skipped_counted_and_listed(tmp_path, flags):
    """A broken training image in mid-epoch and a broken val image: the run goes on without them."""
    data = tmp_path / "data"
    data.mkdir()
    rows = {}
    for split in ("train", "val"):
        lines = [json.loads(x) for x in (flags / "set" / f"{split}.jsonl").read_text().splitlines()]
        for row in lines:
            row["image"] = str(flags / "set" / row["image"])
        rows[split] = lines
    (data / "garbage.jpg").write_bytes(b"this is not a JPEG file")
    good = (flags / "set" / rows["val"][3]["image"]).read_bytes()
    (data / "truncated.jpg").write_bytes(good[: len(good) // 3])
    rows["train"][20]["image"] = str(data / "garbage.jpg")
    rows["val"][3]["image"] = str(data / "truncated.jpg")
    for split, lines in rows.items():
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))

    run = tmp_path / "run"
    argv = train_args(flags, run, "--json")
    argv[argv.index("--dataset") + 1] = str(data / "train.jsonl")
    argv.remove("--no-tensorboard")
    summary = json.loads(invoke(argv).stdout)

    assert summary["steps"] == 8 and summary["skipped_images"] == 2
    listed = [json.loads(x) for x in (run / "skipped.jsonl").read_text().splitlines()]
    reasons = {x["id"]: x["reason"] for x in listed}
    assert reasons.keys() == {rows["train"][20]["id"], rows["val"][3]["id"]}
    assert reasons[rows["train"][20]["id"]] == "not an image" and reasons[rows["val"][3]["id"]]
    train_logs = [r for r in log_lines(run) if r["kind"] == "train"]
    assert train_logs[-1]["skipped"] == 1
    val = [r for r in log_lines(run) if r["kind"] == "val"]
    assert val[-1]["n_pairs"] == 11                 # the broken val pair is left out of the gallery

    # what a finished run leaves behind
    from eclip.model.factory import load_checkpoint
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    best = load_checkpoint(run / "best.safetensors")
    assert best.config.experts.n_vision == 2 and summary["best_epoch"] in (1, 2)
    saved = json.loads((run / "config.json").read_text())
    assert saved["val_dataset"] == str(data / "val.jsonl") and saved["batch_size"] == 12


def test_best_is_the_first_highest_val_rsum_and_both_figures_are_logged(reference):
    run, summary = reference
    val = [r for r in log_lines(run) if r["kind"] == "val"]
    assert val and all("val_loss" in r and "rsum" in r for r in val)
    best = max(val, key=lambda r: r["rsum"])                 # max returns the first of equals
    assert (summary["select_by"], summary["best_step"], summary["best_val_rsum"]) == ("rsum", best["step"], best["rsum"])
    # the flags carry no explanation: every pair trains with its caption in its place, and the run says so
    assert summary["captions_as_explanations"] == summary["train_pairs"] == 48
    assert json.loads((run / "config.json").read_text())["captions_as_explanations"] == 48


def test_a_new_run_never_writes_into_an_old_one(tmp_path, flags):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"output": str(run), "dataset": "x.jsonl", "lr": 1e-3}))
    result = CliRunner().invoke(app, train_args(flags, run))
    assert result.exit_code == 2 and "already holds a run" in result.output and "--resume" in result.output

    result = CliRunner().invoke(app, ["train", "--resume", str(run), "--lr", "0.5"])
    assert result.exit_code == 2 and "--lr cannot change when resuming" in result.output

    result = CliRunner().invoke(app, ["train", "--resume", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "not a training run folder" in result.output


def test_a_single_token_tower_is_said_once_at_start(tmp_path, flags, monkeypatch):
    """A ModifiedResNet image tower gives the experts one token: training says so in one line at start."""
    from conftest import TINY
    monkeypatch.delenv("ECLIP_QUIET", raising=False)
    config = tmp_path / "tiny-rn.json"
    config.write_text(json.dumps({**TINY, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16}}))
    argv = train_args(flags, tmp_path / "run", "--epochs", "1")
    argv[argv.index("--model") + 1] = str(config)
    result = CliRunner(mix_stderr=False).invoke(app, argv)
    assert result.exit_code == 0, (result.stderr[-2000:], result.exception)
    lines = result.stderr.splitlines()
    said = [i for i, line in enumerate(lines) if "one token" in line]
    assert len(said) == 1 and "image tower (ModifiedResNet)" in lines[said[0]], result.stderr[-2000:]
    assert "text tower" not in lines[said[0]]
    assert lines[said[0] - 1].startswith("training 48 pairs"), lines[: said[0] + 1]   # right after the start line


def one_file(flags, folder):
    """train.jsonl and val.jsonl of the flag set as one file elsewhere (absolute image paths)."""
    rows = []
    for name in ("train.jsonl", "val.jsonl"):
        for line in (flags / "set" / name).read_text().splitlines():
            row = json.loads(line)
            row["image"] = str(flags / "set" / row["image"])
            rows.append(row)
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, len(rows)


def run_on(flags, dataset, out, *extra, monkeypatch=None):
    argv = train_args(flags, out, "--epochs", "1", *extra)
    argv[argv.index("--dataset") + 1] = str(dataset)
    monkeypatch.delenv("ECLIP_QUIET", raising=False)    # the run's own lines are what is tested
    return CliRunner().invoke(app, argv)


def test_one_file_holds_out_a_validation_share_by_image(tmp_path, flags, monkeypatch):
    from eclip.config import TrainConfig
    from eclip.train import resume_config
    from eclip.train.inputs import read_splits
    pairs, n = one_file(flags, tmp_path)
    run = tmp_path / "run"
    result = run_on(flags, pairs, run, monkeypatch=monkeypatch)
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0]
    assert first.startswith("validation:") and "5%" in first and "--no-val" in first, result.output
    saved = json.loads((run / "config.json").read_text())
    assert saved["val_fraction"] == 0.05 and saved["val_dataset"] is None and saved["no_val"] is False
    assert json.loads((run / "summary.json").read_text())["best_val_rsum"] is not None
    config = resume_config(run)
    assert config.val_fraction == 0.05                                  # resume keeps the same split
    train, val = read_splits(config)
    assert len(train) + len(val) == n and len(val) == 3               # 5% of 60 images
    assert not {r.image for r in train} & {r.image for r in val}
    again = read_splits(TrainConfig.from_dict({**saved, "output": str(tmp_path / "other")}))
    assert [r.id for r in again[1]] == [r.id for r in val]


def test_hold_out_keeps_every_image_on_one_side_and_does_not_depend_on_order_or_place():
    from eclip.data.records import Record
    from eclip.train.inputs import hold_out
    records = [Record(f"{i}-{k}", f"/data/set/img{i}.jpg", f"caption {k} of {i}") for i in range(40) for k in range(2)]
    train, val = hold_out(records, 0.1)
    assert len({r.image for r in val}) == 4 and len(val) == 8 and len(train) == 72
    assert not {r.image for r in train} & {r.image for r in val}
    assert [r.id for r in hold_out(records[::-1], 0.1)[1]] == [r.id for r in val][::-1]
    moved = [Record(r.id, r.image.replace("/data/set", "/elsewhere/copy"), r.caption) for r in records]
    assert [r.id for r in hold_out(moved, 0.1)[1]] == [r.id for r in val]


def test_no_val_trains_on_everything_and_best_is_the_last(tmp_path, flags, monkeypatch):
    pairs, _ = one_file(flags, tmp_path)
    run = tmp_path / "run"
    result = run_on(flags, pairs, run, "--no-val", monkeypatch=monkeypatch)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].startswith("validation: none (--no-val)"), result.output
    best, last = load_file(run / "best.safetensors"), load_file(run / "last.safetensors")
    assert best.keys() == last.keys() and all(torch.equal(best[k], last[k]) for k in best)
    assert json.loads((run / "config.json").read_text())["no_val"] is True
    # written once: best is a hard link to last (a second full write for nothing before)
    assert (run / "best.safetensors").stat().st_ino == (run / "last.safetensors").stat().st_ino


def test_same_file_links_or_copies_and_keeps_its_version(tmp_path, monkeypatch):
    from eclip.atomic import same_file, write_bytes
    source, target = tmp_path / "last.bin", tmp_path / "best.bin"
    write_bytes(source, b"epoch 1")
    same_file(source, target)
    assert target.read_bytes() == b"epoch 1" and target.stat().st_ino == source.stat().st_ino
    write_bytes(source, b"epoch 2")                  # a later save replaces last; best keeps its version
    assert target.read_bytes() == b"epoch 1"

    def no_links(*args):
        raise OSError("hard links not supported")
    monkeypatch.setattr("os.link", no_links)
    same_file(source, target)                        # a filesystem without hard links: a copy
    assert target.read_bytes() == b"epoch 2" and target.stat().st_ino != source.stat().st_ino
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.bin", "last.bin"]   # no temporary left


@pytest.mark.parametrize("extra, message", [
    (["--no-val", "--val-dataset", "{val}"], "--no-val"),
    (["--val-fraction", "0.1", "--val-dataset", "{val}"], "--val-fraction"),
    (["--val-fraction", "1.5"], "--val-fraction"),
])
def test_validation_options_that_do_not_fit_exit_2(tmp_path, flags, monkeypatch, extra, message):
    pairs, _ = one_file(flags, tmp_path)
    extra = [e.format(val=flags / "set" / "val.jsonl") for e in extra]
    result = run_on(flags, pairs, tmp_path / "run", *extra, monkeypatch=monkeypatch)
    assert result.exit_code == 2 and message in result.output, result.output
