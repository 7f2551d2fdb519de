"""How hard are GI-ITM's hard negatives? Softmax of raw cosines (eclip <= 0.1.0) against softmax of the
contrastive logits exp(logit_scale) * cosine (the reference and ALBEF; eclip now), in the same run.
Then eclip's draw (`--negatives softmax`) against the reference's (`--negatives reference`: the
positive's weight zeroed and 1e-5 added to every weight) over the softmax mass the positive holds,
the figure `eclip train` logs as pos_prob.

    python bench/bench_hard_negatives.py [--batch 192] [--scale 100] [--seeds 20]
    python bench/bench_hard_negatives.py --log RUN/log.jsonl [--log ...]   # the pos_prob a real run reached

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

from eclip.model.itm import REFERENCE_FLOOR, hard_negative_indices, reference_negative_indices


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
    ap.add_argument("--log", action="append", default=[], help="an `eclip train` log.jsonl: its logged pos_prob "
                    "(min, quartiles, max) set the positive probabilities of the second table")
    ap.add_argument("--pos-probs", default="0.1,0.5,0.9,0.99,0.994,0.999,0.9999",
                    help="positive probabilities of the second table without --log")
    ap.add_argument("--batches", default="32,192", help="batch sizes of the second table (the demo's, the paper's)")
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
    print()
    probs, source = positive_probabilities(args.log, args.pos_probs)
    print(f"eclip's draw (softmax) against the reference's (floor {REFERENCE_FLOOR:g}) by the positive's softmax "
          f"mass p ({source}); logits as above at scale {args.scale:g}, {args.seeds} batches each")
    print(f"{'batch':>5} {'p':>7} | {'floor share':>11} {'P(self)':>8} | {'effective cand.':>15} | "
          f"{'mass on 5 hardest':>17} | {'median rank drawn':>17} | {'total variation':>15}")
    print(f"{'':>5} {'':>7} | {'reference':>11} {'ref.':>8} | {'eclip':>7} {'ref.':>7} | {'eclip':>8} {'ref.':>8} | "
          f"{'eclip':>8} {'ref.':>8} | {'eclip vs ref.':>15}")
    for batch in (int(b) for b in args.batches.split(",")):
        for p in probs:
            print(floor_row(batch, p, args.scale, args.seeds))


def positive_probabilities(logs, default):
    """(sorted positive probabilities, where they come from): min, quartiles and max of the pos_prob
    logged in `logs` (eclip train log.jsonl files), else the `default` comma-separated list."""
    import json
    import statistics
    values = [json.loads(line)["pos_prob"] for log in logs for line in open(log, encoding="utf-8")
              if '"pos_prob"' in line]
    if not values:
        return [float(p) for p in default.split(",")], "a fixed grid"
    q = statistics.quantiles(values, n=4)
    return sorted({round(v, 4) for v in (min(values), *q, max(values))}), \
        f"min, quartiles and max of {len(values)} logged pos_prob values in {', '.join(logs)}"


def floor_row(batch, p, scale, seeds):
    """One line of the second table: CLIP-like negatives (as above), the positive's logit set so that it
    holds softmax mass p; both draws' distributions exactly, and the median hardness rank of 2,000
    negatives each draw actually draws per row (rank 0: the pair itself, drawn by the reference only)."""
    eff, top5, rank, tv = torch.zeros(2), torch.zeros(2), torch.zeros(2), 0.0
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        logits = scale * (0.20 + 0.035 * torch.randn(batch, batch, generator=g))
        positive = torch.eye(batch, dtype=torch.bool)
        negatives = logits.masked_fill(positive, float("-inf"))
        # e^L / (e^L + sum_neg) = p  ->  L = log(p / (1 - p)) + logsumexp(negatives)
        logits[positive] = math.log(p / (1 - p)) + negatives.logsumexp(dim=1)
        ours = negatives.softmax(dim=1)
        ref = torch.softmax(logits, dim=1).masked_fill(positive, 0.0) + REFERENCE_FLOOR
        ref = ref / ref.sum(dim=1, keepdim=True)
        tv += 0.5 * (ours - ref).abs().sum(dim=1).mean().item() / seeds
        order = negatives.argsort(dim=1, descending=True)            # hardness rank of each candidate
        hardness = torch.empty_like(order).scatter_(1, order, torch.arange(batch).expand(batch, -1) + 1)
        hardness[positive] = 0
        u = torch.rand(2000, batch, generator=g)
        for k, (dist, draw) in enumerate(((ours, hard_negative_indices), (ref, reference_negative_indices))):
            entropy = -(dist * dist.clamp_min(1e-30).log()).sum(dim=1)
            eff[k] += entropy.exp().mean() / seeds
            top5[k] += dist.masked_fill(positive, 0).topk(5, dim=1).values.sum(dim=1).mean() / seeds
            drawn = torch.stack([draw(logits, positive, u[i]) for i in range(0, 2000, 20)])   # [100, batch]
            rank[k] += hardness.gather(1, drawn.T).float().median() / seeds
    floor = batch * REFERENCE_FLOOR / ((1 - p) + batch * REFERENCE_FLOOR)
    self_p = REFERENCE_FLOOR / ((1 - p) + batch * REFERENCE_FLOOR)
    return (f"{batch:>5} {p:>7.4f} | {floor:>11.3f} {self_p:>8.1e} | {eff[0]:>7.1f} {eff[1]:>7.1f} | "
            f"{top5[0]:>8.3f} {top5[1]:>8.3f} | {rank[0]:>8.1f} {rank[1]:>8.1f} | {tv:>15.3f}")


if __name__ == "__main__":
    main()
