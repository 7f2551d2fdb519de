"""Training straight from webdataset shards (`eclip train --shuffle-buffer N`): no record list, no
random reads. Each epoch the shards are put in an order drawn from (seed, epoch); that order is one
sequence of samples, process r of W takes its contiguous share of it, and each DataLoader worker a
contiguous run of that share, read forward shard by shard (local, fsspec URLs without range
requests, pipe:, .tar.gz) and mixed through a shuffle buffer of N samples (webdataset's
`shardshuffle` + `shuffle(N)`). Memory holds the buffer and one int per shard, whatever the size
of the set.

Every process gets the same number of whole batches (collectives need it): the share is
floor(samples / W) rounded down to local batches, so up to W x local batch - 1 samples at the
end of the epoch's order sit the epoch out; the shard order changes every epoch, so which ones
changes too. A sample that cannot be used (no image, no text, an image that does not decode, a
shard shorter than its count) still takes its place, as an item that carries its error, so the
counts stay exact; the trainer logs it in skipped.jsonl and drops it from its batch.

Sample numbers (the `index` of an item) count samples in the shards' listed order, so a sample
keeps its number across epochs and processes.
"""
from __future__ import annotations

import io
import random

from torch.utils.data import IterableDataset, get_worker_info

from eclip.data.images import ImageError, load_image
from eclip.data.shards import sample_record, shard_samples
from eclip.data.shardset import ShardSet
from eclip.errors import EclipError


def process_share(total: int, world: int, batch: int) -> int:
    """Samples each process reads per epoch: whole local batches, the same on every process."""
    return (total // world) // batch * batch


class ShardStream(IterableDataset):
    """Items {index, image, caption_tokens, explanation_tokens} or {index, error} of this process's
    share of the epoch (see the module); `len` is that share."""

    def __init__(self, shards: ShardSet, preprocess, tokenize, seed: int, buffer: int, batch: int,
                 rank: int = 0, world: int = 1):
        self.shards, self.preprocess, self.tokenize = shards, preprocess, tokenize
        self.seed, self.buffer, self.batch, self.rank, self.world = seed, buffer, batch, rank, world
        self.epoch = 0
        self.exts = shards.columns.image_exts()
        self.share = process_share(len(shards), world, batch)
        if self.share == 0:
            raise EclipError(f"--dataset {shards.dataset}: {len(shards)} samples, fewer than one batch of "
                             f"{batch} per process")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.share

    def _run(self) -> tuple[int, int]:
        """[lo, hi) of the epoch's sample sequence this worker reads: whole batches."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        batches = self.share // self.batch
        first = worker * batches // workers
        last = (worker + 1) * batches // workers
        base = self.rank * self.share
        return base + first * self.batch, base + last * self.batch

    def __iter__(self):
        lo, hi = self._run()
        info = get_worker_info()
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{info.id if info else 0}")
        pool = []
        for entry in self._samples(lo, hi):
            if len(pool) < self.buffer:
                pool.append(entry)
                continue
            if self.buffer:
                j = rng.randrange(len(pool))
                entry, pool[j] = pool[j], entry
            yield self._item(*entry)
        rng.shuffle(pool)
        for entry in pool:
            yield self._item(*entry)

    def _samples(self, lo: int, hi: int):
        """(sample number, Sample or an error) for positions lo..hi-1 of the epoch's order."""
        s = self.shards
        order = list(range(len(s.urls)))
        random.Random(f"{self.seed}/{self.epoch}").shuffle(order)
        position = 0
        for k in order:
            size, start = s.sizes[k], s.starts[k]
            if position + size <= lo:
                position += size
                continue
            if position >= hi:
                return
            skipped, seen = [], 0
            for sample in shard_samples(s.urls[k], self.exts, skipped, stream=True):
                if seen >= size or position + seen >= hi:
                    break
                if lo <= position + seen < hi:
                    yield start + seen, sample
                seen += 1
            reason = skipped[0].reason if skipped else "the shard holds fewer samples than counted"
            for missing in range(seen, min(size, hi - position)):   # keep every process's count exact
                if lo <= position + missing < hi:
                    yield start + missing, f"{s.urls[k]}: {reason}"
            position += size

    def _item(self, index: int, sample) -> dict:
        if isinstance(sample, str):
            return {"index": index, "error": sample}
        hit = next((e for e in self.exts if e in sample.parts), None)
        problems = []
        record = sample_record(sample, self.shards.columns, hit, problems)
        if record is None:
            return {"index": index, "error": f"key {sample.key}: {problems[0].reason}"}
        try:
            image = self.preprocess(load_image(io.BytesIO(sample.parts[hit])))
        except ImageError as e:
            return {"index": index, "error": f"key {sample.key}: {e.reason}"}
        except Exception as e:    # a transform failing on one odd image must not end the epoch
            return {"index": index, "error": f"key {sample.key}: preprocess failed ({type(e).__name__})"}
        found = self.shards.explanations        # as attach_explanations: the cache's line, else the sample's own
        explanation = found.lookup(record.id, record.caption, record.explanation) if found is not None \
            else record.explanation
        tokens = self.tokenize([record.caption, explanation or record.caption])
        return {"index": index, "image": image, "caption_tokens": tokens[0], "explanation_tokens": tokens[1]}


def stream_loader(shards: ShardSet, model_preprocess, tokenize, batch_size: int, workers: int, seed: int,
                  buffer: int):
    """This process's loader over its share, as an Accelerate DataLoaderShard: batches come on the
    process's device, `set_epoch` reaches the stream, and accelerate's skip_first_batches resumes it
    (by reading through the skipped batches: the order is replayed, then the next batch is exact).
    `per_process` tells the trainer not to hand it to accelerator.prepare, which would make process 0
    read everything and dispatch it."""
    from accelerate import PartialState
    from accelerate.data_loader import DataLoaderShard

    from eclip.data.dataset import collate_pairs
    state = PartialState()
    if batch_size % state.num_processes:
        raise EclipError(f"--batch-size {batch_size}: the global batch must split evenly over "
                         f"{state.num_processes} processes")
    local = batch_size // state.num_processes
    stream = ShardStream(shards, model_preprocess, tokenize, seed, buffer, local, state.process_index,
                         state.num_processes)
    loader = DataLoaderShard(stream, device=state.device, batch_size=local, drop_last=True,
                             collate_fn=collate_pairs, num_workers=workers, persistent_workers=False,
                             pin_memory=False)
    loader.per_process = True
    return loader
