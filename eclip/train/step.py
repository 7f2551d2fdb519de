"""One training batch, the same on any number of processes."""
from __future__ import annotations

import math

import torch

MAX_LOGIT_SCALE = math.log(100.0)


def negatives_generator(seed: int, batch_number: int) -> torch.Generator:
    """The generator hard negatives are drawn with, from (seed, batch number): a resumed run
    draws the same negatives as an uninterrupted one."""
    return torch.Generator().manual_seed((seed * 1_000_003 + batch_number) % (1 << 63))


def common_batch(accelerator, batch: dict):
    """-> (this process's batch, the skipped items of every process), or (None, skipped).

    Unreadable images shrink the processes' shares of a batch unevenly, but the
    contrastive loss gathers equal shapes: every share is cut to the smallest one (the
    cut pairs just sit this batch out). None when some share has no image at all.
    """
    n, skipped = len(batch["indices"]), list(batch["skipped"])
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object
        counts = accelerator.gather(torch.tensor([[n, len(skipped)]], device=accelerator.device))
        skipped = gather_object(skipped) if int(counts[:, 1].sum()) else []
        m = int(counts[:, 0].min())
        if m < n:
            batch = {k: v[:m] if torch.is_tensor(v) else v for k, v in batch.items()}
        n = m
    return (batch if n else None), skipped


def forward_backward(accelerator, model, batch: dict, group_ids: torch.Tensor, generator, experts: bool,
                     accum_freq: int = 1) -> dict:
    """Loss of the batch (dict of scalars), gradients accumulated through accelerator.backward;
    with `accum_freq` > 1 computed in that many micro-batches (eclip.train.accumulate)."""
    captions = batch["caption_tokens"]
    # Without experts nothing reads the explanation tokens: an empty batch of them skips
    # a second text-tower pass the plain CLIP baseline does not pay for.
    explanations = batch["explanation_tokens"] if experts else captions[:0]
    if accum_freq > 1:
        from eclip.train.accumulate import accumulated_forward_backward
        return accumulated_forward_backward(accelerator, model, batch["images"], captions, explanations,
                                            group_ids.to(captions.device), generator, accum_freq)
    out = model(batch["images"], captions, explanations, group_ids=group_ids.to(captions.device),
                generator=generator)
    accelerator.backward(out["loss"])
    return out


@torch.no_grad()
def clamp_logit_scale(model) -> None:
    """Keep the learned temperature within [1, 100] (as CLIP and open_clip do)."""
    model.clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
