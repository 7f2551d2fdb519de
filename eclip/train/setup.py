"""What a run is built from: the Accelerator, the model, its optimizer and schedule, and the data."""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import replace

import torch
from torch.utils.data import DataLoader, Sampler

from eclip.config import ExpertConfig, LossConfig, TrainConfig
from eclip.errors import EclipError

PRECISIONS = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}


def launched_distributed() -> bool:
    """True under torchrun / accelerate launch (several processes), before or after init."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or (
        torch.distributed.is_available() and torch.distributed.is_initialized())


def make_accelerator(cfg: TrainConfig):
    """An Accelerator for `cfg`: split_batches, so `batch_size` is the global batch on any number of processes."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import GradientAccumulationPlugin
    if not launched_distributed():
        # A single process may train several times (library use, tests) with other settings;
        # Accelerate keeps its first settings in process-wide singletons unless reset.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    device = cfg.device or ""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise EclipError(f"--device {device}: CUDA is not available on this machine")
        if ":" in device and not launched_distributed():
            torch.cuda.set_device(int(device.split(":", 1)[1]))
    if cfg.precision not in PRECISIONS:
        raise EclipError(f"--precision {cfg.precision}: expected one of {', '.join(PRECISIONS)}")
    try:
        accelerator = Accelerator(
            cpu=device == "cpu", mixed_precision=PRECISIONS[cfg.precision],
            dataloader_config=DataLoaderConfiguration(split_batches=True),
            gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.grad_accum,
                                                                    sync_with_dataloader=True))
    except (ValueError, RuntimeError) as e:
        raise EclipError(f"--precision {cfg.precision} / --device {cfg.device or 'auto'}: "
                         f"{str(e).splitlines()[0]}") from None
    if cfg.batch_size % accelerator.num_processes:
        raise EclipError(f"--batch-size {cfg.batch_size}: the global batch must split evenly over "
                         f"{accelerator.num_processes} processes")
    from eclip.train.inputs import check_accum_freq
    check_accum_freq(cfg.batch_size, cfg.accum_freq, accelerator.num_processes)
    return accelerator


def build_model(cfg: TrainConfig):
    """The EntityCLIP to train, in fp32 on the CPU (Accelerate moves it and handles precision)."""
    from eclip.model.factory import load_model
    spec = replace(cfg.model_spec(), device="cpu", precision="fp32")
    loss = {k: v for k, v in (("eta", cfg.eta), ("lam", cfg.lam), ("negatives", cfg.negatives)) if v is not None}
    counts = {k: v for k, v in (("n_vision", cfg.vision_experts), ("n_text", cfg.text_experts),
                                ("n_shared", cfg.shared_experts)) if v is not None}
    if spec.checkpoint:
        model = load_model(spec)
        _adopt(model, cfg, counts, loss)
    else:
        model = load_model(spec, experts=ExpertConfig(**counts, enabled=not cfg.no_experts), loss=LossConfig(**loss))
    from eclip.train.towers import apply_tower_options
    apply_tower_options(model, cfg)      # --lock-*, --grad-checkpointing
    return model


def _adopt(model, cfg: TrainConfig, counts: dict, loss: dict) -> None:
    """Fine-tuning a checkpoint: its experts are kept (or dropped with --no-experts); eta/lambda may change."""
    have = model.config.experts
    model.config.loss = replace(model.config.loss, **loss)
    if cfg.no_experts:
        model.experts, model.itm = None, None
        model.config.experts = replace(have, enabled=False)
        return
    if not have.enabled:
        raise EclipError(f"--checkpoint {cfg.checkpoint}: it has no experts (trained with --no-experts); "
                         f"pass --no-experts, or start from --model/--pretrained")
    differ = [k for k, v in counts.items() if getattr(have, k) != v]
    if differ:
        raise EclipError(f"--checkpoint {cfg.checkpoint}: its expert counts are {have.n_vision}/{have.n_text}/"
                         f"{have.n_shared} (vision/text/shared); leave the expert options out to keep them")


def make_optimizer(model, lr: float, weight_decay: float, device_type: str = "cpu"):
    """AdamW (Adam when weight_decay is 0, as in METHOD.md); gains, biases and logit_scale never decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            flat = p.ndim < 2 or "bias" in name or "logit_scale" in name or ".ln" in name or "bn" in name
            (no_decay if flat else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if device_type in ("cpu", "cuda"):
        try:   # one fused kernel: ~6x faster than the per-tensor loop on CPU (the 49k-token embedding)
            return torch.optim.AdamW(groups, lr=lr, fused=True)
        except (RuntimeError, TypeError, ValueError):   # an older torch without fused CPU AdamW
            pass
    return torch.optim.AdamW(groups, lr=lr)


def cosine_schedule(optimizer, total_steps: int, warmup_steps: int = 0):
    """Linear warm-up, then cosine annealing to 0 over the remaining optimizer steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        done = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))
    # a closure, not an object: LambdaLR then keeps it out of the saved state, so a resumed
    # run with more --epochs stretches the schedule instead of reloading the old length
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def group_ids(records) -> torch.Tensor:
    """A stable 63-bit id per record from its image path: pairs showing the same file are never
    each other's negatives (and a resumed or multi-process run computes the same ids)."""
    if hasattr(records, "group_ids"):      # streamed shards (eclip.data.stream.ShardSet): one image per sample
        return records.group_ids()
    ids = [int.from_bytes(hashlib.blake2b(r.image.encode(), digest_size=8).digest(), "little") >> 1
           for r in records]
    return torch.tensor(ids, dtype=torch.long)


class EpochShuffle(Sampler):
    """A permutation of the dataset drawn from (seed, epoch): identical on every process and after a resume."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def training_transform(model, augment: dict | None):
    """The model's eval transform, or with `augment` (AugmentationCfg fields) open_clip's training
    transform at the model's size, mean and std: random resized crops, optional colour jitter."""
    if not augment:
        return model.preprocess
    import warnings

    from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2
    try:
        aug = AugmentationCfg(**augment)
    except TypeError as e:
        raise EclipError(f"augment {augment}: not open_clip AugmentationCfg fields ({e})") from None
    with warnings.catch_warnings():
        # open_clip applies color_jitter / color_jitter_prob but still warns they are unused
        warnings.filterwarnings("ignore", message="Unused augmentation cfg items")
        return image_transform_v2(PreprocessCfg(**model.config.preprocess), is_train=True, aug_cfg=aug)


def pair_loader(records, model, batch_size: int, workers: int, seed: int | None = None,
                augment: dict | None = None, shuffle_buffer: int | None = None, cache_mb: float = 0) -> DataLoader:
    """Batches of {indices, images, caption_tokens, explanation_tokens, skipped}; shuffled when `seed` is given,
    images augmented when `augment` is given (see `training_transform`), decoded images and tokens kept in
    memory up to `cache_mb` per loading process (PairDataset). `records` may be a ShardSet: its shards are
    then streamed, each process reading its own share (eclip.data.stream), and nothing is kept."""
    from eclip.data.dataset import PairDataset, collate_pairs
    if hasattr(records, "group_ids"):
        from eclip.data.stream import stream_loader
        return stream_loader(records, training_transform(model, augment), model.tokenizer, batch_size, workers,
                             seed or 0, shuffle_buffer or 0)
    dataset = PairDataset(records, training_transform(model, augment), model.tokenizer, cache_mb=cache_mb)
    shuffle = seed is not None
    return DataLoader(dataset, batch_size=batch_size, sampler=EpochShuffle(len(dataset), seed) if shuffle else None,
                      drop_last=shuffle, collate_fn=collate_pairs, num_workers=workers,
                      # workers live across epochs: forking them anew each epoch cost ~30% of the
                      # loading CPU on the demo set (812 pairs, short epochs)
                      persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())
