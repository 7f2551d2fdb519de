"""`eclip embed`: images and captions to sharded, resumable vectors for match --gallery and evaluate."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from eclip.cli import app
from eclip.cli.options import (Checkpoint, DataRoot, Dataset, Device, Engine, EngineOpt, IdKey, ImageFolder, ImageKey,
                               Model, Precision, PrecisionOpt, Pretrained, Seed, Split, TextKey, columns, model_spec,
                               user_errors)


class Dtype(str, Enum):
    fp16 = "fp16"
    fp32 = "fp32"


class Layout(str, Enum):
    eclip = "eclip"
    clip_retrieval = "clip-retrieval"


HELP = """Embed images and/or captions into OUT_DIR: L2-normalised vectors in sharded .safetensors
files, their ids / paths / texts in Parquet, and manifest.json (written last) naming the model.

\b
Examples:
  eclip embed --images photos/ --output gallery/
  eclip embed --texts captions.txt --images 'shots/**/*.jpg' --output gallery/
  eclip embed --dataset n24news --split test --output n24-test/ \\
              --checkpoint run/best.safetensors
  torchrun --nproc_per_node 4 -m eclip embed --dataset pairs.jsonl -o big/
  eclip embed --dataset pairs.jsonl --format clip-retrieval -o for-autofaiss/

With --format clip-retrieval, OUT_DIR holds img_emb/img_emb_N.npy, text_emb/text_emb_N.npy
and metadata/metadata_N.parquet (image_path, caption, id, entities), row i one pair in all
three, as embedding-reader, autofaiss and clip-retrieval read them.

Re-running the same command resumes: finished shards are kept. Images that cannot be read
are listed in OUT_DIR/errors.jsonl and never stop the run.
"""


@app.command(help=HELP)
def embed(
    output: Annotated[Path, typer.Option("--output", "-o", show_default=False, help="Folder to write (created if needed).")],
    images: Annotated[Optional[str], typer.Option(
        "--images", show_default=False, help="A folder (image files below it), a glob ('imgs/**/*.jpg'), a LIST.txt of paths "
                         "(relative to the list's folder), or one image file. ids are the absolute paths.")] = None,
    texts: Annotated[Optional[Path], typer.Option(
        "--texts", show_default=False, help="FILE.txt (one caption per line; id = line number) or FILE.jsonl "
                        "({\"text\", optional \"id\", \"entities\"}).")] = None,
    dataset: Dataset = None,
    data_root: DataRoot = None,
    split: Split = "test",
    image_folder: ImageFolder = None,
    image_key: ImageKey = None,
    text_key: TextKey = None,
    id_key: IdKey = None,
    shards: Annotated[Optional[str], typer.Option(
        "--shards", metavar="A-B", show_default=False,
        help="With webdataset shards: embed only input shards A to B (from 0, both included), one output "
             "partition per input shard, so machines can split a set by range; copy the parts into one folder "
             "and run once more over every shard to join them (see README).")] = None,
    dtype: Annotated[Dtype, typer.Option("--dtype", help="Storage type of the vectors.")] = Dtype.fp16,
    layout: Annotated[Layout, typer.Option(
        "--format", help="eclip: the layout match --gallery and evaluate --embeddings read. clip-retrieval: "
                         "img_emb/, text_emb/ (.npy) and metadata/ (.parquet), row i one pair, for "
                         "embedding-reader, autofaiss and clip-retrieval.")] = Layout.eclip,
    shard_size: Annotated[int, typer.Option("--shard-size", help="Rows per shard (the unit of resuming).")] = 4096,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images or captions per forward pass.")] = 64,
    workers: Annotated[Optional[int], typer.Option(
        "--workers", show_default=False, help="Image decoding processes. Default: min(4, CPUs); 0 decodes in the main process.")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace embeddings already in OUT_DIR (even another model's) instead of resuming.")] = False,
    model: Model = None,
    pretrained: Pretrained = None,
    checkpoint: Checkpoint = None,
    device: Device = None,
    precision: PrecisionOpt = Precision.fp32,
    seed: Seed = None,
    engine: EngineOpt = Engine.auto,
    json_: Annotated[bool, typer.Option(
        "--json", help="Print the summary as one JSON object on stdout (instead of one line on stderr).")] = False,
):
    with user_errors():
        from eclip.console import note, print_json
        from eclip.embed import embed as run
        summary = run(model_spec(model, pretrained, checkpoint, device, precision, seed), output, images=images,
                      texts=texts, dataset=dataset, data_root=data_root, split=split, dtype=dtype.value,
                      shard_size=shard_size, batch_size=batch_size, workers=workers, overwrite=overwrite,
                      layout=layout.value, engine=engine.value, image_folder=image_folder,
                      columns=columns(image_key, text_key, id_key), shard_range=shards)
        if summary["rank"] != 0:
            return
        if json_:
            print_json(summary)
            return
        errors = f", {summary['errors']} unreadable (see {summary['errors_file']})" if summary.get("errors") else ""
        if summary["layout"] == "clip-retrieval":
            rows = max(summary["images"], summary["texts"])
            note(f"{rows} rows{errors} -> {summary['output']} in the clip-retrieval layout "
                 f"({summary['written']} partitions written, {summary['reused']} reused)")
            return
        note(f"{summary['images']} images{errors}, {summary['texts']} texts -> {summary['output']} "
             f"({summary['written']} shards written, {summary['reused']} reused)")
        if summary.get("texts_truncated"):
            from eclip.model.text_limit import MAX_TEXT_CHARS
            note(f"{summary['texts_truncated']} captions longer than {MAX_TEXT_CHARS:,} characters were cut to that "
                 f"length before tokenizing (the model reads only their first tokens)")
