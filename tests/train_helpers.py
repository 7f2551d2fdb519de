"""Shared by the training tests: a tiny model config, a small real flag set, the CLI call."""
import json

import torch
from typer.testing import CliRunner

from eclip.cli import app

TINY32 = {   # the tiny test model with a 32-token context: captions here are short, steps 2x cheaper
    "embed_dim": 64, "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def build_flags(folder, n_flags=12, views=6):
    """Real flags (flagpy) as train.jsonl / val.jsonl under folder/set, and folder/tiny32.json."""
    from eclip.data.demo_set import build_demo_set
    build_demo_set(folder / "set", n_flags=n_flags, views_per_entity=views, include_photos=False, image_size=64)
    (folder / "tiny32.json").write_text(json.dumps(TINY32))
    return folder


def train_args(flags, out, *extra):
    """2 epochs of 4 steps (48 pairs, batch 12) with small experts."""
    return ["train", "--dataset", str(flags / "set" / "train.jsonl"), "--model", str(flags / "tiny32.json"),
            "--pretrained", "none", "--device", "cpu", "--epochs", "2", "--batch-size", "12", "--lr", "1e-3",
            "--vision-experts", "2", "--text-experts", "2", "--shared-experts", "2", "--workers", "0",
            "--log-every", "1", "--no-tensorboard", "--output", str(out), *extra]


def invoke(argv):
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def one_thread_run(argv) -> dict:
    """The CLI in this process on one thread (as the subprocesses run), -> its --json summary."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return json.loads(invoke([*argv, "--json"]).stdout)
    finally:
        torch.set_num_threads(threads)


def log_lines(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def same_last_weights(run_a, run_b) -> bool:
    """The two runs' last.safetensors hold the same tensors, bit for bit."""
    from safetensors.torch import load_file
    a, b = (load_file(str(run / "last.safetensors")) for run in (run_a, run_b))
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
