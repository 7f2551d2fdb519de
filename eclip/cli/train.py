"""`eclip train`: fine-tune EntityCLIP (or plain CLIP with --no-experts) on image-text pairs."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from eclip.cli import app
from eclip.cli.options import (Checkpoint, DataRoot, Dataset, Device, Explanations, IdKey, ImageFolder, ImageKey, Json,
                               Model, Precision, Pretrained, TextKey, model_spec, user_errors)

OPT, EXP, RUN = "Optimisation (defaults: METHOD.md)", "EntityCLIP", "Run"
MEM = "Memory (README: training on a small GPU)"

HELP = """Fine-tune EntityCLIP on image-text pairs (or plain CLIP with --no-experts, the baseline).

The same command runs on CPU, one GPU, or many under `torchrun --nproc_per_node N -m eclip train ...`
(or `accelerate launch -m eclip train ...`). --batch-size is the GLOBAL batch, split over the processes;
contrastive negatives are gathered across them, so N processes train like one with the same batch.

RUN_DIR (--output) receives config.json, log.jsonl, skipped.jsonl, best.safetensors (the first
validation with the highest val rsum = R@1+5+10 of both directions, or the lowest val loss with
--select-by val-loss; later ties do not replace it),
last.safetensors, curves.png, summary.json and state/ (saved atomically at the end of each epoch, or
of every --save-frequency K-th, and every --save-every steps). `eclip train --resume RUN_DIR`
continues exactly where the last state left off.
"""


def _opt(panel: str, default: str | None = None, help: str = "", *names: str, **kw):
    """A typer option whose own default is None (so --resume can tell what was given) but whose
    help shows the real default. Numbers show as N or X (narrow columns leave room for the help)."""
    return typer.Option(*names, rich_help_panel=panel, help=help, show_default=default or False, **kw)


def _int(panel: str, default: str | None = None, help: str = "", *names: str, **kw):
    return _opt(panel, default, help, *names, metavar="N", **kw)


def _float(panel: str, default: str | None = None, help: str = "", *names: str, **kw):
    return _opt(panel, default, help, *names, metavar="X", **kw)


OptInt, OptFloat, OptBool, OptPath = Optional[int], Optional[float], Optional[bool], Optional[Path]


@app.command(help=HELP, no_args_is_help=True)
def train(
    dataset: Dataset = None,
    output: Annotated[OptPath, _opt(RUN, "runs/<dataset>", "RUN_DIR: a new folder for this run.",
                                    "--output", "-o")] = None,
    resume: Annotated[OptPath, _opt(
        RUN, None, "Continue the run in RUN_DIR with its saved options (--epochs, --workers, --val-frequency, "
        "--eval-every, --save-frequency, --save-every, --log-every, --device, --tensorboard may be changed).",
        "--resume", metavar="RUN_DIR")] = None,
    data_root: DataRoot = None,
    val_dataset: Annotated[Optional[str], _opt(
        "Data", None, "Validation pairs. Default: the benchmark's val split; for FILE the file beside it "
        "with 'train' replaced by 'val' in its name, else --val-fraction of FILE.", "--val-dataset")] = None,
    val_fraction: Annotated[OptFloat, _float(
        "Data", "0.05 without a val file", "Hold out this share of --dataset's images, with all their pairs, "
        "for validation (the same images on every run and resume).", "--val-fraction")] = None,
    no_val: Annotated[OptBool, _opt(
        "Data", None, "Train without validation: best.safetensors is the last model.", "--no-val")] = None,
    explanations: Explanations = None,
    image_folder: ImageFolder = None,
    image_key: ImageKey = None,
    text_key: TextKey = None,
    id_key: IdKey = None,
    shuffle_buffer: Annotated[OptInt, _int(
        "Data", None, "Stream webdataset shards with no record list: a shuffled shard order each epoch, each "
        "process its own share, pairs mixed through a buffer of N samples (0: each shard in its order). Needs "
        "--val-dataset or --no-val. Default: read the pairs first and draw a permutation.", "--shuffle-buffer",
        min=0)] = None,
    model: Model = None,
    pretrained: Pretrained = None,
    checkpoint: Checkpoint = None,
    device: Device = None,
    precision: Annotated[Optional[Precision], _opt(
        "Model", "fp32", "Mixed precision through Accelerate (weights stay fp32).", "--precision")] = None,
    epochs: Annotated[OptInt, _int(OPT, "20", min=1)] = None,
    batch_size: Annotated[OptInt, _int(OPT, "192", "GLOBAL batch (all processes together); an incomplete "
                                                   "last batch is dropped.", min=1)] = None,
    lr: Annotated[OptFloat, _float(OPT, "1e-5", "Peak learning rate of AdamW (which is Adam when "
                                                  "--weight-decay is 0, the default).", min=0.0)] = None,
    weight_decay: Annotated[OptFloat, _float(OPT, "0", min=0.0)] = None,
    warmup_steps: Annotated[OptInt, _int(OPT, "0", "Linear warm-up steps, then cosine decay to 0 over "
                                                   "all steps.", min=0)] = None,
    grad_accum: Annotated[OptInt, _int(OPT, "1", "Batches per optimizer step: their gradients are summed, but "
                                                 "negatives still come from one batch (for memory use "
                                                 "--accum-freq).", min=1)] = None,
    accum_freq: Annotated[OptInt, _int(MEM, "1", "Compute each batch in N equal micro-batches: the whole batch's "
                                                 "loss, gradient and negatives, with the memory of a micro-batch "
                                                 "(the towers run twice). Must divide --batch-size.", min=1)] = None,
    grad_checkpointing: Annotated[OptBool, _opt(
        MEM, None, "Recompute the towers' blocks and the experts in the backward pass: far less activation "
        "memory, the same results, one more forward pass of each.", "--grad-checkpointing")] = None,
    seed: Annotated[OptInt, _int(OPT, "42")] = None,
    lock_image: Annotated[OptBool, _opt(OPT, None, "Freeze the image tower.", "--lock-image")] = None,
    lock_text: Annotated[OptBool, _opt(OPT, None, "Freeze the text tower.", "--lock-text")] = None,
    lock_image_unlocked_groups: Annotated[OptInt, _int(
        MEM, "0", "Freeze the image tower except its last N layer groups (open_clip's: patch embedding, each "
        "block, the projection).", min=0)] = None,
    lock_text_unlocked_layers: Annotated[OptInt, _int(
        MEM, "0", "Freeze the text tower except its last N layer groups (open_clip's: embeddings, each block, "
        "the projection).", min=0)] = None,
    lock_image_freeze_bn_stats: Annotated[OptBool, _opt(
        MEM, None, "Also freeze the running statistics of a locked image tower's batch norms (ResNet, timm).",
        "--lock-image-freeze-bn-stats")] = None,
    tower_cache_mb: Annotated[OptFloat, _float(
        OPT, "1024", "Memory for a locked tower's outputs, computed once per distinct caption (and image, "
        "without --augment) instead of every step; 0: off.", min=0.0)] = None,
    data_cache_mb: Annotated[OptFloat, _float(
        OPT, "0", "Memory for decoded training images and tokens, per image-loading process: later epochs "
        "skip reading, decoding and tokenizing what is kept (augmentations still run); 0: off. For sets that "
        "fit, e.g. the demo's; streamed shards are not kept.", min=0.0)] = None,
    tower_cache_disk: Annotated[OptBool, _opt(
        OPT, None, "Also keep the locked tower's outputs in RUN_DIR/tower-cache/ (read back on --resume).",
        "--tower-cache-disk")] = None,
    eta: Annotated[OptFloat, _float(EXP, "0.1", "Weight of the GI-ITM matching loss.", min=0.0)] = None,
    lam: Annotated[OptFloat, _float(EXP, "0.1", "Weight of VTC on the experts' V*, T*.", "--lambda",
                                  min=0.0)] = None,
    negatives: Annotated[Optional[str], _opt(
        EXP, "softmax", "How GI-ITM draws hard negatives: softmax (over the non-positives) or reference (the "
        "reference code's draw: 1e-5 added to every weight, close to uniform once the positive dominates; "
        "METHOD.md).", "--negatives", metavar="softmax|reference")] = None,
    vision_experts: Annotated[OptInt, _int(EXP, "4", min=0)] = None,
    text_experts: Annotated[OptInt, _int(EXP, "4", min=0)] = None,
    shared_experts: Annotated[OptInt, _int(EXP, "4", min=0)] = None,
    no_experts: Annotated[OptBool, _opt(EXP, None, "Plain CLIP fine-tuning (contrastive loss only): the "
                                                   "baseline to compare EntityCLIP with.", "--no-experts")] = None,
    augment: Annotated[OptBool, _opt(
        OPT, None, "Augment training images with open_clip's training transform: random crops of 50-100% and "
        "mild colour jitter, no flips (off by default, as in the reference; saved in config.json).",
        "--augment")] = None,
    select_by: Annotated[Optional[str], _opt(
        RUN, "rsum", "Which validation makes best.safetensors: rsum (highest val rsum) or val-loss (lowest "
        "validation contrastive loss, the reference's rule). Both are logged at every validation.",
        "--select-by", metavar="rsum|val-loss")] = None,
    protocol: Annotated[Optional[str], _opt(
        RUN, "eclip", "paper: the reference code's choices in one switch: --select-by val-loss, --negatives "
        "reference and its readers (README, 'Comparing with the paper').", "--protocol", metavar="eclip|paper")] = None,
    workers: Annotated[OptInt, _int(RUN, "4", "Image-loading processes.", min=0)] = None,
    val_frequency: Annotated[OptInt, _int(RUN, "1", "Validate at the end of every K-th epoch and of the last "
                                                    "(open_clip's --val-frequency); validation does not change "
                                                    "the training.", min=1)] = None,
    eval_every: Annotated[OptInt, _int(RUN, "0", "Also validate every N optimizer steps (0: at the end of "
                                                 "epochs only).", min=0)] = None,
    save_frequency: Annotated[OptInt, _int(RUN, "1", "Save last.safetensors and the resumable state at the end "
                                                     "of every K-th epoch and of the last (open_clip's "
                                                     "--save-frequency); a killed run resumes from the last save.",
                                           min=1)] = None,
    save_every: Annotated[OptInt, _int(RUN, "0", "Also save the resumable state every N optimizer steps "
                                                 "(0: at the ends of epochs only).", min=0)] = None,
    log_every: Annotated[OptInt, _int(RUN, "10", "Log the mean losses every N optimizer steps.", min=1)] = None,
    tensorboard: Annotated[OptBool, _opt(RUN, "on", "Write RUN_DIR/tensorboard (when the tensorboard "
                                                    "package is installed).", "--tensorboard/--no-tensorboard")] = None,
    json_out: Json = False,
):
    with user_errors():
        from eclip.config import AUGMENT, NEGATIVES, SELECT_BY, TrainConfig
        from eclip.errors import EclipError
        if select_by not in (None, *SELECT_BY):      # before torch is imported
            raise EclipError(f"--select-by {select_by}: one of {', '.join(SELECT_BY)}")
        if negatives not in (None, *NEGATIVES):
            raise EclipError(f"--negatives {negatives}: one of {', '.join(NEGATIVES)}")
        from eclip.protocol import PAPER_TRAIN, check_protocol, paper_options
        check_protocol(protocol)
        from eclip.train.inputs import check_inputs
        from eclip.train.rundir import resume_config

        spec = model_spec(model, pretrained, checkpoint, device, precision)
        given = {
            "dataset": dataset, "data_root": str(data_root) if data_root else None, "val_dataset": val_dataset,
            "val_fraction": val_fraction, "no_val": no_val,
            "explanations": str(explanations) if explanations else None, "image_folder": image_folder,
            "image_key": image_key, "text_key": text_key, "id_key": id_key,
            "shuffle_buffer": shuffle_buffer,
            "model": spec.model,
            "pretrained": spec.pretrained, "checkpoint": spec.checkpoint, "device": spec.device,
            "precision": spec.precision, "epochs": epochs, "batch_size": batch_size, "lr": lr,
            "weight_decay": weight_decay, "warmup_steps": warmup_steps, "grad_accum": grad_accum, "seed": seed,
            "lock_image": lock_image, "lock_text": lock_text, "eta": eta, "lam": lam, "negatives": negatives,
            "lock_image_unlocked_groups": lock_image_unlocked_groups,
            "lock_text_unlocked_layers": lock_text_unlocked_layers,
            "lock_image_freeze_bn_stats": lock_image_freeze_bn_stats, "grad_checkpointing": grad_checkpointing,
            "accum_freq": accum_freq,
            "tower_cache_mb": tower_cache_mb, "tower_cache_disk": tower_cache_disk, "data_cache_mb": data_cache_mb,
            "vision_experts": vision_experts, "text_experts": text_experts, "shared_experts": shared_experts,
            "no_experts": no_experts, "augment": AUGMENT if augment else None, "select_by": select_by,
            "workers": workers, "val_frequency": val_frequency, "eval_every": eval_every,
            "save_frequency": save_frequency, "save_every": save_every,
            "log_every": log_every, "tensorboard": tensorboard,
            "protocol": protocol if protocol != "eclip" else None,
        }
        given = paper_options(protocol, given, PAPER_TRAIN)
        if resume is not None:
            config = resume_config(resume, output=str(output) if output else None, **given)
        else:
            if dataset is None:
                raise EclipError("--dataset is required for a new run (or --resume RUN_DIR)")
            output = output or default_output(dataset)
            config = TrainConfig(output=str(output), **{k: v for k, v in given.items() if v is not None})
        splits = check_inputs(config, resume=resume is not None)   # bad input: exit 2 before torch loads
        from eclip.train import train as run_training
        summary = run_training(config, resume=resume is not None, splits=splits)
        if os.environ.get("RANK", "0") == "0":    # under torchrun / accelerate launch: print once
            _print(summary, json_out)


def default_output(dataset: str) -> Path:
    """runs/n24news for a benchmark, runs/<folder>-<stem> for a file (runs/flags-train): the same name
    in every process of a multi-process launch."""
    path = Path(dataset)
    from eclip.data.benchmarks import BENCHMARKS
    if dataset.lower() in BENCHMARKS:
        return Path("runs") / dataset.lower()
    if path.suffix.lower() not in (".jsonl", ".csv"):   # shards, parquet: a name without / { } * ...
        import re
        return Path("runs") / (re.sub(r"[^A-Za-z0-9._-]+", "-", dataset).strip("-.")[-60:] or "data")
    return Path("runs") / (f"{path.resolve().parent.name}-{path.stem}" if path.resolve().parent.name else path.stem)


def _print(summary: dict, as_json: bool) -> None:
    from eclip.console import out, print_json
    if as_json:
        print_json(summary)
        return
    from rich.table import Table
    table = Table(title="eclip train", show_header=False)
    best, loss = summary["best_val_rsum"], summary.get("best_val_loss")
    by = "lowest val loss" if summary.get("select_by") == "val-loss" else "highest val rsum"
    rows = [("best checkpoint by", by if best is not None else "the last model (no validation)"),
            ("its val rsum / val loss", "-" if best is None else f"{best:.2f} / "
             + ("-" if loss is None else f"{loss:.4f}")),
            ("at epoch / step", f"{summary['best_epoch']} / {summary['best_step']}")]
    last = summary.get("last_val") or {}
    for key, label in (("t2i_r1", "last val R@1 text->image"), ("i2t_r1", "last val R@1 image->text")):
        if key in last:
            rows.append((label, f"{last[key]:.2f}"))
    if summary.get("captions_as_explanations"):
        rows.append(("captions as explanations", f"{summary['captions_as_explanations']} of {summary['train_pairs']}"))
    rows += [("steps", str(summary["steps"])), ("skipped images", str(summary["skipped_images"])),
             ("time", f"{summary['elapsed_s']:.1f} s"), ("best checkpoint", summary["best_checkpoint"]),
             ("last checkpoint", summary["last_checkpoint"]), ("log", summary["log"]),
             ("curves", summary["curves"] or "-")]
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)
