"""The order training reads shard data in: whole shards in a shuffled order, samples in their order
inside a shard, mixed by a bounded shuffle buffer (open_clip / webdataset's `shardshuffle` +
`shuffle(N)`), so reads run forward through each shard instead of jumping across all of them.

The buffer holds record indices, not images: memory does not grow with it or with the data's
size beyond one int per pair. The order is drawn from (seed, epoch) alone, so every process of a
multi-process run draws the same one (Accelerate then gives each its slice of every batch) and a
resumed run skips exactly the batches it had trained on.
"""
from __future__ import annotations

import random

from torch.utils.data import Sampler

from eclip.data.members import container_of


def shard_runs(records) -> list[tuple[int, int]]:
    """[(start, stop)]: the runs of consecutive records whose images lie in one shard or table (a
    record of plain files is a run of its own)."""
    runs = []
    for i, r in enumerate(records):
        where = container_of(r.image)
        if runs and where is not None and where == runs[-1][2]:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1, where])
    return [(a, b) for a, b, _ in runs]


class ShardStreamOrder(Sampler):
    """Indices of `records` in streaming order (see the module); `buffer` 0 keeps each shard's order."""

    def __init__(self, records, seed: int, buffer: int):
        self.runs, self.n = shard_runs(records), len(records)
        self.seed, self.buffer, self.epoch = seed, buffer, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        runs = list(self.runs)
        rng.shuffle(runs)
        pool = []
        for start, stop in runs:
            for i in range(start, stop):
                if len(pool) < self.buffer:
                    pool.append(i)
                    continue
                if not self.buffer:
                    yield i
                    continue
                j = rng.randrange(len(pool))
                yield pool[j]
                pool[j] = i
        rng.shuffle(pool)
        yield from pool

    def __len__(self) -> int:
        return self.n
