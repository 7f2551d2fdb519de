"""--accum-freq: a batch computed in micro-batches has the whole batch's losses and gradients."""
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
    assert set(losses) == ({"loss", "vtc", "gfm", "vtc_star"} if experts else {"loss", "vtc"})
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
