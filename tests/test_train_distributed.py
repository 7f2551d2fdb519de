"""Two processes train like one (torchrun, 2 CPU processes with gloo, as a user would run GPUs).

Contrastive negatives and GI-ITM hard negatives come from the global batch (features gathered
with gradient, uniforms shared by broadcast), so splitting a batch over processes must not
change a step, and `eclip train` under torchrun must give the run one process gives.
One launch does both: tests/dist_step.py runs the step, then the command line.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train_helpers import build_flags, log_lines, one_thread_run, train_args

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def flags(tmp_path_factory):
    return build_flags(tmp_path_factory.mktemp("flags"))


@pytest.fixture(scope="module")
def launched(flags, tiny_config_path, tmp_path_factory):
    """-> (gradients file of the 2-process step, run folder of the 2-process `eclip train`, its summary)."""
    folder = tmp_path_factory.mktemp("two")
    grads, run = folder / "grads.safetensors", folder / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ECLIP_QUIET": "1", "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(HERE / "dist_step.py"), str(grads), str(tiny_config_path),
                           *train_args(flags, run, "--json")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout             # the summary is printed once, by process 0
    return grads, run, json.loads(lines[0])


@pytest.mark.slow
def test_two_processes_give_the_loss_and_gradients_of_one_also_in_micro_batches(launched, tmp_path, tiny_config_path):
    from dist_step import run
    one = tmp_path / "one.safetensors"
    run(str(one), str(tiny_config_path))           # one process, the whole batch, here
    a = load_file(one)
    for b in (load_file(launched[0]), load_file(str(launched[0]).replace(".safetensors", "-accum.safetensors"))):
        same_step(a, b)


def same_step(a, b):
    loss, vtc, gfm, vtc_star = a["losses"].tolist()
    assert gfm > 0 and vtc_star > 0                 # the experts and hard negatives took part
    torch.testing.assert_close(b["losses"], a["losses"], rtol=1e-5, atol=1e-6)
    assert set(a) == set(b)
    assert {"clip", "experts", "itm"} <= {k.split(".")[1] for k in a if k.startswith("grad.")}
    for name in a:
        if name.startswith("grad."):
            scale = float(a[name].abs().max()) + 1e-12
            diff = float((a[name] - b[name]).abs().max())
            assert diff <= 1e-4 * scale, f"{name}: two processes differ from one by {diff:.3g} (max {scale:.3g})"


@pytest.mark.slow
def test_eclip_train_under_torchrun_trains_like_one_process(launched, flags, tmp_path):
    _, two, summary = launched
    one = tmp_path / "one"
    reference = one_thread_run(train_args(flags, one))
    assert summary["steps"] == reference["steps"] == 8
    a, b = load_file(one / "last.safetensors"), load_file(two / "last.safetensors")
    for name in a:
        x, y = a[name], b[name]
        if name.endswith("attn.in_proj_bias"):
            # the key bias: its true gradient is 0 (softmax ignores it), so Adam turns float noise
            # of either run into steps of +-lr; the query and value biases must still agree
            w = len(x) // 3
            x, y = torch.cat([x[:w], x[2 * w:]]), torch.cat([y[:w], y[2 * w:]])
        torch.testing.assert_close(y, x, rtol=0, atol=2e-4, msg=name)
    ours, theirs = log_lines(two), log_lines(one)
    assert [(r["kind"], r["step"]) for r in ours] == [(r["kind"], r["step"]) for r in theirs]
    for x, y in zip(ours, theirs):
        if x["kind"] == "train":
            assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
        else:                                       # validation was spread over both processes
            assert x["n_pairs"] == y["n_pairs"] == 12
