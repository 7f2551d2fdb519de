"""A webdataset shard set as `train --shuffle-buffer` sees it before streaming it: the shard URLs and
how many samples each holds, no record list. Torch-free, so `eclip train` checks it before torch
loads; eclip.data.stream streams it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from eclip.data.members import is_remote
from eclip.data.records import Record
from eclip.data.shards import Columns
from eclip.errors import EclipError


def shard_sizes(urls: list[str]) -> list[int]:
    """Samples per shard: from webdataset's sizes.json or img2dataset's NNNNN_stats.json beside the
    shards when present, else by reading the tar headers once (member names only)."""
    sizes = []
    for url in urls:
        n = _recorded_size(url)
        sizes.append(n if n is not None else _count_keys(url))
    return sizes


def _recorded_size(url: str):
    if is_remote(url) or url.startswith("pipe:"):
        return None
    path = Path(url)
    sizes = path.parent / "sizes.json"
    if sizes.is_file():
        try:
            value = json.loads(sizes.read_text()).get(path.name)
            if isinstance(value, int):
                return value
        except (json.JSONDecodeError, AttributeError):
            pass
    stats = path.parent / (path.name.split(".")[0] + "_stats.json")
    if stats.is_file():
        try:
            value = json.loads(stats.read_text()).get("successes")
            if isinstance(value, int):
                return value
        except (json.JSONDecodeError, AttributeError):
            pass
    return None


def _count_keys(url: str) -> int:
    from eclip.data.shards import KEY_EXT
    from eclip.data.tarmembers import DamagedTar
    keys, last = 0, None
    try:
        for name in _member_names(url):
            m = KEY_EXT.match(name)
            if m and m[1] != last:
                keys, last = keys + 1, m[1]
    except (DamagedTar, EOFError, OSError, ValueError):
        pass      # a damaged shard counts what it holds up to the damage
    return keys


def _member_names(url: str):
    """The member names of a shard: a local .tar mapped into memory, any other read as a stream."""
    import contextlib
    import mmap

    from eclip.data.shards import open_shard
    from eclip.data.tarmembers import member_names, tar_members
    stream = is_remote(url) or url.startswith("pipe:") or url.lower().endswith((".tar.gz", ".tgz"))
    with open_shard(url, stream=stream) as f:
        if not stream:
            if os.fstat(f.fileno()).st_size == 0:
                return
            with contextlib.closing(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)) as buf:
                yield from member_names(buf)
            return
        source = f
        if url.lower().endswith((".tar.gz", ".tgz")):
            import gzip
            source = gzip.GzipFile(fileobj=f)
        for name, _, _, _ in tar_members(source, keep=lambda name: False):
            yield name


class ShardSet:
    """The training pairs of a shard set, as the trainer sees them without reading them: a length,
    and for sample number i a stand-in Record naming its shard and position (for skipped.jsonl)."""

    def __init__(self, dataset: str, urls: list[str], sizes: list[int], columns: Columns,
                 explanations=None):     # eclip.explain.cache.Explanations
        self.dataset, self.urls, self.sizes, self.columns = dataset, urls, sizes, columns
        self.explanations = explanations
        self.starts = [sum(sizes[:i]) for i in range(len(sizes))]

    def __len__(self) -> int:
        return sum(self.sizes)

    def __getitem__(self, i: int) -> Record:
        import bisect
        s = bisect.bisect_right(self.starts, i) - 1
        return Record(f"{self.urls[s]}#{i - self.starts[s]}", f"{self.urls[s]}#{i - self.starts[s]}", "")

    def __iter__(self):
        raise TypeError("a ShardSet is streamed (eclip.data.stream.ShardStream), not iterated")

    def group_ids(self):
        """Each sample its own image: no two are ever kept from being each other's negatives."""
        import torch
        return torch.arange(len(self), dtype=torch.long)


def open_shard_set(dataset: str, columns: Columns | None = None, explanations=None) -> ShardSet:
    from eclip.data.shards import list_shards
    urls = list_shards(dataset)
    found = None
    if explanations is not None:
        from eclip.data.explanations import CACHE, read_explanations
        kind, found = read_explanations(explanations)
        if kind != CACHE:
            raise EclipError(f"--explanations {explanations}: streamed shards take an `eclip explain` cache "
                             f"(keyed by sample and caption), not an image-keyed file")
    return ShardSet(dataset, urls, shard_sizes(urls), columns or Columns(), found)
