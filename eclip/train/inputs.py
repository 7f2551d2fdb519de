"""What a training run needs that can be checked before torch loads: the data files, the
validation pairs (resolve_validation, hold_out, read_splits live here for that reason), the model options and the run folder. The command line checks these
first (`check_inputs`), so a bad input is reported in a fraction of a second rather than after
torch, open_clip and the model have loaded; the records read here go on to the trainer.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

from eclip.config import TrainConfig
from eclip.errors import EclipError


def check_inputs(cfg: TrainConfig, resume: bool = False):
    """-> (train records, val records) after checking the run folder and the model options."""
    from eclip.model.source import resolve_source
    from eclip.train.rundir import RunDir
    if not cfg.dataset:
        raise EclipError("--dataset is required (or --resume RUN_DIR to continue a run)")
    if not resume:
        RunDir(cfg.output).check_fresh()
    from eclip.train.towers import check_tower_options
    check_accum_freq(cfg.batch_size, cfg.accum_freq)
    splits = read_splits(resolve_validation(cfg))
    check_tower_options(cfg, resolve_source(cfg.model_spec()).clip_config)
    return splits


DEFAULT_VAL_FRACTION = 0.05


def resolve_validation(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with its validation decided once, so config.json keeps it and a resume validates on
    the same pairs: --no-val; --val-dataset; --val-fraction; else the benchmark's val split, the
    file beside FILE with 'train' -> 'val' in its name, or DEFAULT_VAL_FRACTION of FILE's images."""
    from eclip.data.readers import BENCHMARKS
    if cfg.val_fraction is not None and not 0 < cfg.val_fraction < 1:
        raise EclipError(f"--val-fraction {cfg.val_fraction}: a share of the images between 0 and 1 (0.05: 5%)")
    if cfg.no_val:
        if cfg.val_dataset or cfg.val_fraction is not None:
            raise EclipError("--no-val trains without validation: drop --val-dataset / --val-fraction")
        return cfg
    if cfg.val_dataset:
        if cfg.val_fraction is not None:
            raise EclipError("--val-fraction holds pairs of --dataset out for validation: give it or "
                             "--val-dataset, not both")
        return cfg
    if cfg.val_fraction is not None:
        return cfg
    if str(cfg.dataset).lower() in BENCHMARKS:
        return replace(cfg, val_dataset=cfg.dataset)
    path = Path(cfg.dataset)
    sibling = path.with_name(path.name.replace("train", "val"))
    if "train" in path.name and sibling.is_file():
        return replace(cfg, val_dataset=str(sibling))
    return replace(cfg, val_fraction=DEFAULT_VAL_FRACTION)


def validation_line(cfg: TrainConfig) -> str:
    """What a run validates on, in words (the first line of the run); `cfg` from resolve_validation."""
    if cfg.no_val:
        return "validation: none (--no-val); best.safetensors is the last model"
    if cfg.val_fraction is not None:
        return (f"validation: {100 * cfg.val_fraction:g}% of the images of {cfg.dataset} held out, with all "
                f"their pairs (--val-fraction; --val-dataset FILE or --no-val instead)")
    from eclip.data.readers import BENCHMARKS
    if str(cfg.val_dataset).lower() in BENCHMARKS:
        return f"validation: the {cfg.val_split} split of {cfg.val_dataset}"
    return f"validation: the pairs of {cfg.val_dataset}"


def hold_out(records, fraction: float):
    """(train, val): the share `fraction` of the distinct image files (at least one) and every pair
    showing them go to val, so no image is on both sides. Which images is fixed by a hash of each
    path below the images' common folder: the same whatever the order of the records or where
    the folder lies."""
    images = list(dict.fromkeys(r.image for r in records))
    if len(images) < 2:
        raise EclipError(f"--val-fraction {fraction}: {len(images)} image file(s), too few to hold some out; "
                         f"give --val-dataset FILE or --no-val")
    base = os.path.commonpath(images)
    key = {p: hashlib.blake2b(os.path.relpath(p, base).encode(), digest_size=8).digest() for p in images}
    n_val = min(len(images) - 1, max(1, round(fraction * len(images))))
    val_images = set(sorted(images, key=lambda p: (key[p], p))[:n_val])
    return [r for r in records if r.image not in val_images], [r for r in records if r.image in val_images]


def _stream(cfg: TrainConfig, keys, explanations):
    """--shuffle-buffer: the shards of --dataset, to be streamed (eclip.data.stream); nothing read but
    their names and sizes."""
    from eclip.data.sources import check_source
    from eclip.data.shardset import open_shard_set
    if cfg.shuffle_buffer < 0:
        raise EclipError(f"--shuffle-buffer {cfg.shuffle_buffer}: a number of samples, 0 or more")
    if check_source(cfg.dataset) != "shards":
        raise EclipError(f"--shuffle-buffer streams webdataset shards; --dataset {cfg.dataset} is not shards")
    if cfg.val_fraction is not None:
        raise EclipError("--shuffle-buffer streams the shards: holding pairs out (--val-fraction) would need "
                         "them all read first; give --val-dataset or --no-val")
    return open_shard_set(cfg.dataset, keys, explanations)


def read_splits(cfg: TrainConfig):
    """(train records, val records) of a config from resolve_validation (val is [] with no_val)."""
    from eclip.data.readers import read_dataset
    root = Path(cfg.data_root) if cfg.data_root else None
    explanations = Path(cfg.explanations) if cfg.explanations else None
    from eclip.data.shards import Columns
    keys = Columns.given(cfg.image_key, cfg.text_key, cfg.id_key)
    if cfg.shuffle_buffer is not None:
        train = _stream(cfg, keys, explanations)
    else:
        train = read_dataset(cfg.dataset, root, cfg.train_split, explanations, image_folder=cfg.image_folder,
                             columns=keys, protocol=cfg.protocol)
    skipped = getattr(train, "skipped", [])      # samples the reader left out: the trainer logs them
    if cfg.no_val:
        val = []
    elif cfg.val_fraction is not None:
        train, val = hold_out(train, cfg.val_fraction)
    else:
        # the paper's GoodNews val leaves out pairs without an explanation: it needs them to know which
        paper_goodnews = cfg.protocol == "paper" and str(cfg.val_dataset).lower() == "goodnews"
        val = read_dataset(cfg.val_dataset, root, cfg.val_split, explanations if paper_goodnews else None,
                           image_folder=cfg.image_folder, columns=keys, protocol=cfg.protocol)
        if not val:
            raise EclipError(f"{cfg.val_dataset}: no validation pairs")
    if len(train) < cfg.batch_size:
        raise EclipError(f"--dataset {cfg.dataset}: {len(train)} training pairs, fewer than one batch "
                         f"(--batch-size {cfg.batch_size}; incomplete batches are dropped)")
    if skipped:
        from eclip.data.shards import RecordList
        train = RecordList(train, skipped)
    return train, val


def check_accum_freq(batch_size: int, accum_freq: int, processes: int = 1) -> None:
    """EclipError unless --accum-freq splits --batch-size into equal micro-batches (on every process)."""
    if accum_freq < 1:
        raise EclipError(f"--accum-freq {accum_freq}: at least 1")
    if batch_size % accum_freq:
        fits = [k for k in range(2, min(batch_size, 64) + 1) if batch_size % k == 0][:6]
        raise EclipError(f"--accum-freq {accum_freq}: does not divide --batch-size {batch_size} into equal "
                         f"micro-batches (divisors: {', '.join(map(str, fits)) or 'none'})")
    if (batch_size // accum_freq) % processes:
        raise EclipError(f"--accum-freq {accum_freq}: micro-batches of {batch_size // accum_freq} do not split "
                         f"evenly over {processes} processes")
