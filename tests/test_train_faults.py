"""`eclip train` when things go wrong around it: a full disk during a save, a resume from another
directory, a resume in the middle of a logging window."""
import errno
import json
import os
import shutil

import pytest
import torch
from typer.testing import CliRunner

from eclip.cli import app
from eclip.train.rundir import RunDir

from conftest import mounted_tmpfs
from train_helpers import build_flags, invoke, log_lines, train_args


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def flags(tmp_path_factory):
    return build_flags(tmp_path_factory.mktemp("flags"))


def run_cli(argv):
    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:
        runner = CliRunner()
    return runner.invoke(app, [str(a) for a in argv])


def after_first_save(monkeypatch, then):
    """Call `then()` right after the run's first state save has completed."""
    original, calls = RunDir.save_state, []

    def save_state(self, accelerator, trainer):
        final = original(self, accelerator, trainer)
        calls.append(final)
        if len(calls) == 1:
            then()
        return final

    monkeypatch.setattr(RunDir, "save_state", save_state)
    return calls


def timeless(rows):
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "pairs_per_s")} for r in rows]


def states(run):
    return sorted(p.name for p in (run / "state").iterdir())


# --- R3: a full disk during a state save ---------------------------------------------------

def check_full_disk_report(result, run):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "no space left on device" in line and str(run / "state") in line, line
    assert states(run) == ["step-000000001"]          # the partial save is gone, the previous state kept


@pytest.fixture
def small_disk(tmp_path):
    """A 200 MB tmpfs (needs root and a kernel that lets this container mount)."""
    yield from mounted_tmpfs(tmp_path / "disk", "size=200m", "test_state_save_failing_with_enospc")


def fill(folder, leave: int):
    """Write a file that leaves `leave` bytes free on the filesystem of `folder`."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    with open(folder / "filler", "wb") as f:
        f.truncate(0)
        remaining = free - leave
        while remaining > 0:
            n = f.write(b"\0" * min(remaining, 1 << 20))
            remaining -= n


@pytest.mark.slow
def test_full_disk_during_a_state_save_on_a_real_small_filesystem(tmp_path, flags, small_disk, monkeypatch):
    """The disk fills up after the first state save: room enough for last.safetensors (13 MB) but not for
    the optimizer state, which torch writes through its zip writer (its error does not say ENOSPC)."""
    run = small_disk / "run"
    argv = train_args(flags, run, "--epochs", "1", "--save-every", "1")
    after_first_save(monkeypatch, lambda: fill(small_disk, leave=20 << 20))
    result = run_cli(argv)
    check_full_disk_report(result, run)

    (small_disk / "filler").unlink()
    monkeypatch.undo()
    summary = json.loads(invoke(["train", "--resume", str(run), "--json"]).stdout)
    assert summary["steps"] == 4 and states(run) == ["step-000000004"]


def test_state_save_failing_with_enospc(tmp_path, flags, monkeypatch):
    """Without a small filesystem: the write layer under accelerate's save_state (torch.save) fails with
    ENOSPC after writing part of its file, as it does on a full disk."""
    run = tmp_path / "run"

    def full_disk_save(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

    after_first_save(monkeypatch, lambda: monkeypatch.setattr(torch, "save", full_disk_save))
    result = run_cli(train_args(flags, run, "--epochs", "1", "--save-every", "1"))
    check_full_disk_report(result, run)


# --- R5: resume from another directory -----------------------------------------------------

def test_resume_from_another_directory(tmp_path, flags, monkeypatch):
    monkeypatch.chdir(flags)     # relative paths as a user types them: set/train.jsonl, tiny32.json, runs/x
    argv = train_args(flags, "x", "--epochs", "1")
    for flag, value in (("--dataset", "set/train.jsonl"), ("--model", "tiny32.json"), ("--output", "runs/r5")):
        argv[argv.index(flag) + 1] = value
    invoke(argv)
    run = flags / "runs" / "r5"
    saved = json.loads((run / "config.json").read_text())
    assert saved["dataset"] == str(flags / "set" / "train.jsonl") and saved["model"] == str(flags / "tiny32.json")
    assert saved["output"] == str(run) and saved["val_dataset"] == str(flags / "set" / "val.jsonl")

    monkeypatch.chdir(tmp_path)
    summary = json.loads(invoke(["train", "--resume", str(run), "--epochs", "2", "--json"]).stdout)
    assert summary["steps"] == 8
    monkeypatch.chdir(flags)     # the same options, typed relative again, are the same run
    result = run_cli(["train", "--resume", "runs/r5", "--dataset", "set/train.jsonl", "--epochs", "2"])
    assert result.exit_code == 0, result.output


# --- R6: the log after a resume reads as one run --------------------------------------------

@pytest.mark.slow
def test_resume_inside_a_logging_window_logs_what_an_uninterrupted_run_logs(tmp_path, flags, monkeypatch):
    extra = ("--log-every", "3", "--save-every", "2")
    whole = tmp_path / "whole"
    invoke(train_args(flags, whole, *extra))

    stopped = tmp_path / "stopped"

    def interrupt():
        raise KeyboardInterrupt
    after_first_save(monkeypatch, interrupt)      # stopped at step 2, inside the window of steps 1-3
    result = run_cli(train_args(flags, stopped, *extra))
    assert result.exit_code == 130 and states(stopped) == ["step-000000002"]
    monkeypatch.undo()
    invoke(["train", "--resume", str(stopped)])
    assert [r["step"] for r in log_lines(whole) if r["kind"] == "train"] == [3, 4, 6, 8]
    assert timeless(log_lines(stopped)) == timeless(log_lines(whole))
