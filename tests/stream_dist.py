"""Run under torchrun: each process streams its share of a shard set (eclip.data.stream, two DataLoader
workers) for two epochs; process 0 writes every process's sample numbers to OUT (JSON), then the
rest of the command line, if any, runs `eclip` in the same launch.

    torchrun --nproc_per_node 2 tests/stream_dist.py OUT SHARDS BATCH [eclip args...]
"""
import json
import sys

import torch


def run(out: str, shards: str, batch: int) -> None:
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from eclip.data.shardset import open_shard_set
    from eclip.data.stream import stream_loader
    state = PartialState(cpu=True)
    seen = {}
    loader = stream_loader(open_shard_set(shards), _image, _tokens, batch, workers=2, seed=3, buffer=8)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        mine = [int(i) for b in loader for i in b["indices"].tolist()]
        seen[epoch] = gather_object([mine])
    if state.is_main_process:
        with open(out, "w") as f:
            json.dump({"batches": len(loader), "epochs": seen}, f)
    state.wait_for_everyone()


def _image(im):
    return torch.zeros(3, 4, 4)


def _tokens(texts):
    return torch.zeros(len(texts), 4, dtype=torch.long)


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    if len(sys.argv) > 4:
        from eclip.cli import main
        sys.argv = ["eclip", *sys.argv[4:]]
        main()
