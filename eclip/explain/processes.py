"""Several processes under torchrun / accelerate launch: who am I, and wait for the others.

accelerate's PartialState sets up the process group (gloo on CPU, nccl on GPU) the way
the launchers expect; on a CPU-only machine it must be told `cpu=True`, or it quietly
runs every process as a world of one and its barriers do nothing.
"""
from __future__ import annotations

import os


def rank_world() -> tuple:
    """(rank, world_size) as torchrun and accelerate launch set them; (0, 1) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def shard(items: list, rank: int, world_size: int) -> list:
    """The share of `items` process `rank` of `world_size` generates: every world_size-th
    item, so the shares are disjoint, cover everything, and differ in size by at most one."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size} processes")
    return items[rank::world_size]


def process_state():
    import torch
    from accelerate import PartialState
    return PartialState(cpu=not torch.cuda.is_available())


def barrier() -> None:
    process_state().wait_for_everyone()


def gather(value) -> list:
    """`value` from every process, in rank order, on every process."""
    from accelerate.utils import gather_object
    process_state()
    return gather_object([value])
