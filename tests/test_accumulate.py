"""--accum-freq: a batch computed in micro-batches has the whole batch's losses and gradients."""
import json

import pytest
import torch

from conftest import make_tiny
from eclip.config import ExpertConfig, TrainConfig
from eclip.train.setup import make_accelerator
from eclip.train.step import forward_backward, negatives_generator


def step(model, accelerator, batch, ids, experts, accum_freq):
    """One training step's losses and gradients (fp32, CPU; the tiny model has no dropout)."""
    model.zero_grad()
    out = forward_backward(accelerator, model, batch, ids, negatives_generator(42, 7), experts, accum_freq)
    return ({k: v.detach() for k, v in out.items()},
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


def pairs(model, n):
    torch.manual_seed(3)
    return {"images": torch.randn(n, 3, 64, 64),
            "caption_tokens": model.tokenize([f"a photo of item {i} " + "word " * (i % 9) for i in range(n)]),
            "explanation_tokens": model.tokenize([f"item {i} is explained " + "more " * (i % 13) for i in range(n)])}


@pytest.mark.parametrize("experts", [True, False], ids=["entityclip", "no-experts"])
def test_batch_32_accum_freq_4_equals_one_batch_of_128(tiny_config_path, experts):
    """VTC, VTC* and GI-ITM (hard negatives drawn from all 128 pairs with one generator, their
    token states read with gradient) and every parameter's gradient, to 1e-5."""
    model = make_tiny(tiny_config_path, **({} if experts else {"experts": ExpertConfig(enabled=False)}))
    accelerator = make_accelerator(TrainConfig(output="-", device="cpu", batch_size=128, accum_freq=4))
    batch = pairs(model, 128)
    ids = torch.arange(128)
    ids[5] = ids[6]                     # two pairs of one image: never each other's negatives
    losses, grads = step(model, accelerator, batch, ids, experts, 1)
    losses_4, grads_4 = step(model, accelerator, batch, ids, experts, 4)
    assert set(losses) == ({"loss", "vtc", "gfm", "vtc_star", "pos_prob"} if experts else {"loss", "vtc"})
    torch.testing.assert_close(losses_4, losses, rtol=1e-5, atol=1e-5)
    assert set(grads_4) == set(grads) and any(n.startswith("clip.visual") for n in grads)
    if experts:
        assert any(n.startswith("experts.shared") for n in grads) and "itm.gate.weight" in grads
    torch.testing.assert_close(grads_4, grads, rtol=1e-5, atol=1e-5)
    # what --grad-accum does instead (four batches of 32, each its own negatives) is another objective
    model.zero_grad()
    for i in range(4):
        part = {k: v[32 * i: 32 * (i + 1)] for k, v in batch.items()}
        out = model(part["images"], part["caption_tokens"],
                    part["explanation_tokens"] if experts else part["caption_tokens"][:0], ids[32 * i: 32 * (i + 1)],
                    negatives_generator(42, 7))
        (out["loss"] / 4).backward()
    assert not torch.allclose(model.clip.visual.proj.grad, grads["clip.visual.proj"], rtol=1e-3, atol=1e-5)


def test_the_command_line_trains_the_same_weights_in_micro_batches_with_checkpointing(tmp_path):
    """`eclip train --accum-freq 3 --grad-checkpointing` = the same run without them (AdamW steps),
    with part of each tower frozen; config.json records every option."""
    from safetensors.torch import load_file

    from train_helpers import build_flags, one_thread_run, train_args
    flags = build_flags(tmp_path / "flags", n_flags=8, views=6)
    lock = ["--lock-image-unlocked-groups", "3", "--lock-text-unlocked-layers", "2", "--epochs", "1", "--no-val"]
    runs = {}
    for name, extra in (("plain", []), ("micro", ["--accum-freq", "3", "--grad-checkpointing"])):
        one_thread_run(train_args(flags, tmp_path / name, *lock, *extra))
        runs[name] = load_file(tmp_path / name / "last.safetensors")
    config = json.loads((tmp_path / "micro" / "config.json").read_text())
    assert (config["accum_freq"], config["grad_checkpointing"], config["lock_image_unlocked_groups"],
            config["lock_text_unlocked_layers"], config["lock_image_freeze_bn_stats"]) == (3, True, 3, 2, False)
    assert runs["plain"].keys() == runs["micro"].keys()
    for key, want in runs["plain"].items():
        got = runs["micro"][key]
        if key.endswith("in_proj_bias"):
            # the key bias shifts every score of a query alike: its true gradient is 0, and Adam
            # (g / sqrt(v)) turns the rounding noise it gets instead into lr-sized steps
            d = len(want) // 3
            got, want = torch.cat([got[:d], got[2 * d:]]), torch.cat([want[:d], want[2 * d:]])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-5, msg=key)   # lr 1e-3: steps of ~1e-3
