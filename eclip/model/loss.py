"""The training objective: L = VTC(V_cls, T_cls) + eta * L_GFM + lambda * VTC(V*, T*).

VTC is open_clip's ClipLoss with features gathered across processes *with* gradient,
so N processes with batch b see the same negatives as one process with batch N*b.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from open_clip.loss import ClipLoss


def world() -> tuple[int, int]:
    """(rank, world_size) of the current process group, (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def vtc_loss(image_features, text_features, logit_scale) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch (inputs L2-normalised)."""
    rank, size = world()
    loss = ClipLoss(local_loss=False, gather_with_grad=True, rank=rank, world_size=size)
    return loss(image_features, text_features, logit_scale)


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every process along dim 0, keeping gradient for float tensors.

    open_clip's gather_features only handles an (image, text) pair; the matching loss needs
    more tensors (tokens, masks, expert outputs), hence this small general version.
    """
    rank, size = world()
    if size == 1:
        return x
    if x.is_floating_point() and x.requires_grad:
        return torch.cat(torch.distributed.nn.all_gather(x), dim=0)
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def shared_uniforms(n: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """[2, n] uniforms identical on every process (rank 0's draw is broadcast)."""
    u = torch.rand(2, n, generator=generator).to(device)
    if world()[1] > 1:
        dist.broadcast(u, src=0)
    return u
