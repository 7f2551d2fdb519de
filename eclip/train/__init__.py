"""Fine-tuning EntityCLIP (or plain CLIP with `no_experts`) through Accelerate.

    from eclip.config import TrainConfig
    from eclip.train import train, resume_config
    summary = train(TrainConfig(output="runs/n24", dataset="n24news", pretrained="openai"))
    summary = train(resume_config("runs/n24"), resume=True)      # continue a stopped run

The same code runs on CPU, one GPU, and under `accelerate launch` / `torchrun` on many:
`batch_size` is the global batch, split over the processes, and contrastive negatives
are gathered across them, so N processes train like one process with the same batch.

A run folder holds: config.json (the options), state/ (resumable state, saved atomically),
best.safetensors and last.safetensors (eclip checkpoints), log.jsonl (metrics),
skipped.jsonl (unreadable images), curves.png, summary.json, and tensorboard/ when installed.
All processes of a run share its folder: across machines it must be on a filesystem they
all see (as Accelerate's save_state assumes).
"""
__all__ = ["train", "resume_config", "check_inputs"]


def __getattr__(name):
    # Lazy: `eclip.train.inputs` and `eclip.train.rundir` are torch-free, so the command line can
    # check a run's inputs before the loop (and torch) is imported.
    if name == "train":
        from eclip.train.loop import train
        return train
    if name == "resume_config":
        from eclip.train.rundir import resume_config
        return resume_config
    if name == "check_inputs":
        from eclip.train.inputs import check_inputs
        return check_inputs
    raise AttributeError(name)
