"""How hard are GI-ITM's hard negatives? Softmax of raw cosines (eclip <= 0.1.0) against softmax of the
contrastive logits exp(logit_scale) * cosine (the reference and ALBEF; eclip now), in the same run.

    python bench/bench_hard_negatives.py [--batch 192] [--scale 100] [--seeds 20]

Similarities are CLIP-like by construction (stated, not measured from a pretrained model, which this
machine cannot download): for each query the positive has cosine 0.32 and the batch's other
candidates N(0.20, 0.035), the spread of ViT-B-32 image-caption cosines on news photos.
Figures per query row, averaged: the effective number of candidates exp(entropy) (of B-1), the
probability mass on the 5 hardest negatives, and the median hardness rank (1 = hardest) of the
negative hard_negative_indices actually draws.
"""
import argparse
import math

import torch

from eclip.model.itm import hard_negative_indices


def figures(weights_from, cos, positive, generator):
    logits = weights_from(cos)
    masked = logits.masked_fill(positive, float("-inf"))
    p = masked.softmax(dim=1)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(dim=1)
    top5 = p.topk(5, dim=1).values.sum(dim=1)
    drawn = hard_negative_indices(logits, positive, torch.rand(cos.shape[0], generator=generator))
    order = masked.argsort(dim=1, descending=True)
    rank = (order == drawn[:, None]).float().argmax(dim=1) + 1
    return entropy.exp().mean().item(), top5.mean().item(), rank.float().median().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=192)
    ap.add_argument("--scale", type=float, default=100.0, help="exp(logit_scale); CLIP ends training at 100")
    ap.add_argument("--seeds", type=int, default=20)
    args = ap.parse_args()
    rows = {"cosine (before)": lambda c: c, f"logits, scale {args.scale:g} (now)": lambda c: args.scale * c}
    totals = {name: [0.0, 0.0, 0.0] for name in rows}
    for seed in range(args.seeds):
        g = torch.Generator().manual_seed(seed)
        cos = 0.20 + 0.035 * torch.randn(args.batch, args.batch, generator=g)
        cos.fill_diagonal_(0.32)
        positive = torch.eye(args.batch, dtype=torch.bool)
        for name, fn in rows.items():
            for k, v in enumerate(figures(fn, cos, positive, torch.Generator().manual_seed(seed))):
                totals[name][k] += v / args.seeds
    print(f"batch {args.batch} ({args.batch - 1} negatives per query), {args.seeds} batches")
    print(f"{'weights from':<24} {'effective candidates':>21} {'mass on 5 hardest':>18} {'median rank drawn':>18}")
    for name, (eff, top5, rank) in totals.items():
        print(f"{name:<24} {eff:>21.1f} {top5:>18.3f} {rank:>18.1f}")
    before, after = totals.values()
    print(f"ratio now/before: effective candidates {after[0] / before[0]:.3f}x, "
          f"mass on 5 hardest {after[1] / before[1]:.1f}x")


if __name__ == "__main__":
    main()
