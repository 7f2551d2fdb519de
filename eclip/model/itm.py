"""Gated Integrative Image-Text Matching (METHOD.md, "GI-ITM"): hard negatives and the match head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def hard_negative_indices(logits: torch.Tensor, positive: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One negative per query row, drawn with probability softmax(logits) over non-positives (ALBEF-style).

    logits [Q, G] query-vs-candidate contrastive logits, exp(logit_scale) * cosine (raw cosines
    would make the draw almost uniform); positive [Q, G] bool (the pair itself and any candidate
    known to match, e.g. the same image file); u [Q] uniforms in [0, 1).
    Positives are masked before the softmax, which gives the same distribution as masking after it
    and renormalising, without underflow when the positive dominates.
    Inverse-CDF sampling with given uniforms (not torch.multinomial) so every process draws the
    same negatives for the same global batch. Returns [Q] candidate indices, -1 where a row has
    no negative at all (batch of one, or every candidate is a positive).
    """
    has_negative = (~positive).any(dim=1)
    masked = logits.float().masked_fill(positive, float("-inf"))
    masked[~has_negative] = 0.0                      # rows without a negative: anything finite
    weights = F.softmax(masked, dim=1).masked_fill(positive, 0.0)
    cdf = weights.cumsum(dim=1)
    target = u.to(cdf)[:, None] * cdf[:, -1:]
    # right=True: the first index whose cdf exceeds the target always has non-zero weight
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)
    # u * total may round up to the total: never step past the last candidate with weight
    last = logits.shape[1] - 1 - (weights > 0).flip(1).int().argmax(dim=1)
    idx = torch.minimum(idx, last)
    return torch.where(has_negative, idx, torch.full_like(idx, -1))


# the reference's floor (clip/model.py, CLIP.itm_loss): added to every weight after the diagonal is zeroed
REFERENCE_FLOOR = 1e-5


@torch.no_grad()
def reference_negative_indices(logits: torch.Tensor, positive: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One negative per query row as the reference draws it (`--negatives reference`): the softmax over
    the whole row (positive included), the positives' weights zeroed, then REFERENCE_FLOOR added to
    every weight (positives too) before the draw. Once the positive holds most of the softmax, the
    floor is most of the mass: the draw is then close to uniform over the batch, and the pair itself
    can be drawn as its own "negative" (the reference trains it with the label 0).

    Same arguments and inverse-CDF draw as hard_negative_indices; every row has a candidate, so no -1.
    """
    weights = F.softmax(logits.float(), dim=1).masked_fill(positive, 0.0) + REFERENCE_FLOOR
    cdf = weights.cumsum(dim=1)
    idx = torch.searchsorted(cdf, u.to(cdf)[:, None] * cdf[:, -1:], right=True).squeeze(1)
    return idx.clamp_max(logits.shape[1] - 1)


def positive_probability(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mean over query rows of the softmax mass on the row's positives: how peaked the draw's softmax
    is (at 0.994 in a batch of 192 the reference's floor is a quarter of its draw)."""
    return (F.softmax(logits.float(), dim=1) * positive).sum(dim=1).mean()


class MatchingHead(nn.Module):
    """W_f gates all expert outputs of a pair into one vector; a linear head says match / no match."""

    def __init__(self, width: int, n_outputs: int):
        super().__init__()
        self.gate = nn.Linear(2 * width, n_outputs)     # W_f over concat(V_cls, T_cls)
        self.classify = nn.Linear(width, 2)

    def forward(self, v_cls, t_cls, outputs):
        """v_cls, t_cls [N, D]; outputs [N, n_outputs, D] (image-side then text-side) -> logits [N, 2]."""
        weights = F.softmax(self.gate(torch.cat([v_cls, t_cls], dim=-1)), dim=-1)
        fused = (weights[..., None] * outputs).sum(dim=1)
        return self.classify(fused)
