"""Two writers on one output: started at the same moment, exactly one runs and the other stops at
once (exit 2, one line naming the folder or file and the other process's id); nothing is written
twice or mixed. Each pair of processes is real and begins each command together
(tests/start_together.py)."""
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from eclip.explain.cache import iter_entries

from test_explain_endpoint import PLAIN, Stub, ok_body
from train_helpers import build_flags, train_args

HERE = Path(__file__).parent


def start_together(folder: Path, commands: list, preload=()) -> list:
    """-> [{"pid", "results": [{"code", "stderr"}, ...]}, ...] of two processes a and b."""
    env = {**os.environ, "ECLIP_QUIET": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(HERE.parent)}
    argv = [json.dumps([[str(a) for a in c] for c in commands]), *preload]
    procs = {name: subprocess.Popen([sys.executable, str(HERE / "start_together.py"), str(folder), name, *argv],
                                    env=env, stderr=subprocess.PIPE, text=True) for name in "ab"}
    deadline = time.monotonic() + 300
    for k in range(len(commands)):
        while not all((folder / f"ready-{k}-{n}").exists() for n in procs):
            dead = [n for n, p in procs.items() if p.poll() is not None]
            assert not dead, procs[dead[0]].stderr.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.005)
        (folder / f"go-{k}").touch()
    for p in procs.values():
        assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    return [json.loads((folder / f"result-{n}.json").read_text()) for n in procs]


def winner_and_loser(runs: list, k: int, what: Path):
    """The command k of one process ran (exit 0), the other's was refused naming `what` and the winner's pid."""
    codes = sorted(r["results"][k]["code"] for r in runs)
    assert codes == [0, 2], [r["results"][k] for r in runs]
    winner, loser = sorted(runs, key=lambda r: r["results"][k]["code"])
    line = loser["results"][k]["stderr"].strip()
    assert len(line.splitlines()) == 1, line
    assert str(what) in line and f"pid {winner['pid']}" in line, line
    return winner, loser


def test_two_explain_runs_on_one_cache_never_ask_twice(tmp_path):
    captions = [f"Caption {i}: Angela Merkel in Berlin." for i in range(30)]
    stub = Stub(lambda prompt, attempt: (200, {}, ok_body(prompt), 0.03))
    try:
        texts, prompt, cache = tmp_path / "captions.txt", tmp_path / "prompt.txt", tmp_path / "c.jsonl"
        texts.write_text("\n".join(captions) + "\n")
        prompt.write_text(PLAIN)
        command = ["explain", "--texts", texts, "-o", cache, "--endpoint", stub.url, "--llm", "stub-llm",
                   "--concurrency", "2", "--prompt-template", prompt]
        runs = start_together(tmp_path, [command])
    finally:
        stub.close()
    winner_and_loser(runs, 0, cache)
    assert set(stub.seen) == set(captions) and set(stub.seen.values()) == {1}   # no caption paid for twice
    assert Counter(e["caption"] for e in iter_entries(cache)) == Counter(captions)


@pytest.mark.slow
def test_two_embeds_then_two_trains_on_one_output(tmp_path, tiny_config_path, real_images):
    flags = build_flags(tmp_path / "flags", n_flags=6, views=4)
    model = ["--model", tiny_config_path, "--pretrained", "none", "--device", "cpu"]
    gallery, run = tmp_path / "gallery", tmp_path / "run"
    embed = ["embed", "--images", real_images["astronaut"].parent, "--output", gallery, "--workers", "0", *model]
    train = train_args(flags, run, "--epochs", "1", "--batch-size", "4")
    runs = start_together(tmp_path, [embed, train], preload=("torch", "open_clip", "eclip.train", "eclip.embed"))

    winner_and_loser(runs, 0, gallery)
    manifest = json.loads((gallery / "manifest.json").read_text())
    assert manifest["images"]["count"] == len(real_images)

    winner_and_loser(runs, 1, run)
    summary = json.loads((run / "summary.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert summary["steps"] == config["epochs"] * 3 and (run / "last.safetensors").is_file()
    assert [p.name for p in (run / "state").iterdir()] == [f"step-{summary['steps']:09d}"]
