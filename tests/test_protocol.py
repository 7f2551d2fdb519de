"""`--protocol paper` on `eclip train`: one switch for the reference's settings, saved with the run
and in the checkpoint, and the GI-ITM positive probability logged (the readers' side is in
test_benchmarks.py)."""
import json

import torch
from safetensors import safe_open

from train_helpers import build_flags, invoke, log_lines, train_args


def test_train_under_the_paper_protocol_selects_by_val_loss_and_draws_the_references_negatives(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    flags = build_flags(tmp_path)
    run = tmp_path / "run"
    try:
        summary = json.loads(invoke(train_args(flags, run, "--protocol", "paper", "--json")).stdout)
    finally:
        torch.set_num_threads(threads)
    config = json.loads((run / "config.json").read_text())
    assert (config["protocol"], config["select_by"], config["negatives"]) == ("paper", "val-loss", "reference")
    assert summary["select_by"] == "val-loss"
    with safe_open(str(run / "last.safetensors"), "pt") as f:
        model_config = json.loads(f.metadata()["config"])
    assert model_config["loss"]["negatives"] == "reference"        # the checkpoint says how it was trained
    train = [r for r in log_lines(run) if r["kind"] == "train"]
    assert train and all(0.0 < r["pos_prob"] < 1.0 for r in train)
