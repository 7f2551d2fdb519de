"""Gated Integrative Image-Text Matching (METHOD.md, "GI-ITM"): hard negatives and the match head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def hard_negative_indices(sim: torch.Tensor, positive: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One negative per query row, drawn with probability softmax(sim) over non-positives (ALBEF-style).

    sim [Q, G] query-vs-candidate similarities; positive [Q, G] bool (the pair itself and any
    candidate known to match, e.g. the same image file); u [Q] uniforms in [0, 1).
    Inverse-CDF sampling with given uniforms (not torch.multinomial) so every process draws the
    same negatives for the same global batch. Returns [Q] candidate indices, -1 where a row has
    no negative at all (batch of one, or every candidate is a positive).
    """
    weights = F.softmax(sim.float(), dim=1).masked_fill(positive, 0.0)
    has_negative = (~positive).any(dim=1)
    # softmax can underflow to 0 for every negative: fall back to uniform over the negatives then
    underflow = (weights.sum(dim=1) == 0)[:, None]
    weights = torch.where(underflow, (~positive).float(), weights)
    cdf = weights.cumsum(dim=1)
    target = u.to(cdf)[:, None] * cdf[:, -1:]
    # right=True: the first index whose cdf exceeds the target always has non-zero weight
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_max(sim.shape[1] - 1)
    return torch.where(has_negative, idx, torch.full_like(idx, -1))


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
