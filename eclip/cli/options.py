"""Options shared by several subcommands, spelled the same everywhere.

Only typer is imported here: `eclip --help` must not pay for torch.
"""
from __future__ import annotations

import contextlib
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from eclip.errors import EclipError


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class Engine(str, Enum):
    auto = "auto"
    onnx = "onnx"
    torch = "torch"


class Search(str, Enum):
    auto = "auto"
    exact = "exact"
    flat = "flat"
    ivf = "ivf"


MODEL_PANEL = "Model"
DATA_PANEL = "Data"

Model = Annotated[Optional[str], typer.Option(
    "--model", rich_help_panel=MODEL_PANEL, show_default=False,
    help="open_clip architecture (ViT-B-32, ...), hf-hub:org/repo, local-dir:PATH, or a model-config JSON file. "
         "Default: ViT-B-32 (with --pretrained openai) unless --checkpoint is given.")]
Pretrained = Annotated[Optional[str], typer.Option(
    "--pretrained", rich_help_panel=MODEL_PANEL, show_default=False,
    help="Pretrained tag (openai, laion2b_s34b_b79k, ...) or a local .safetensors weights file (pickled "
         ".pt/.bin files are refused, with the command that converts them); 'none' for random weights.")]
Checkpoint = Annotated[Optional[Path], typer.Option(
    "--checkpoint", rich_help_panel=MODEL_PANEL, show_default=False,
    help="An eclip .safetensors checkpoint; it alone rebuilds the model (overrides --model/--pretrained).")]
Device = Annotated[Optional[str], typer.Option(
    "--device", rich_help_panel=MODEL_PANEL, show_default=False,
    help="cpu, cuda, cuda:1, mps ... Default: cuda when available, else cpu.")]
PrecisionOpt = Annotated[Precision, typer.Option(
    "--precision", rich_help_panel=MODEL_PANEL, help="Compute precision.")]
Seed = Annotated[Optional[int], typer.Option(
    "--seed", rich_help_panel=MODEL_PANEL, show_default=False,
    help="Seed of random weights (--pretrained none); the same seed gives the same model. Default: 0.")]
EngineOpt = Annotated[Engine, typer.Option(
    "--engine", rich_help_panel=MODEL_PANEL, envvar="ECLIP_ENGINE",
    help="What runs the model: onnx (ONNX Runtime on the CPU, starts in a second or two; the model is "
         "exported to the eclip cache on first use), torch (GPU, fp16/bf16), or auto: onnx for fp32 on "
         "the CPU with a weights file or checkpoint, torch otherwise.")]
SearchOpt = Annotated[Search, typer.Option(
    "--search", help="Gallery search: exact (brute force), flat (FAISS exact), ivf (FAISS approximate), "
                     "auto (exact up to 50k rows, flat up to 1M, ivf above).")]

Dataset = Annotated[Optional[str], typer.Option(
    "--dataset", rich_help_panel=DATA_PANEL, show_default=False,
    help="n24news | visualnews | goodnews; a FILE.jsonl / .csv / .tsv with fields image, text "
         "[, id, explanation, entities]; .parquet (a file, folder or glob) with the image bytes inside; "
         "webdataset shards ('shards/{00000..00099}.tar', a folder of .tar, a LIST.txt of URLs, https://, "
         "s3://, pipe:CMD); or img2dataset's files folder.")]
ImageKey = Annotated[Optional[str], typer.Option(
    "--image-key", rich_help_panel=DATA_PANEL, show_default=False,
    help="Image field: shard member extensions as a ';'-list (default jpg;png;jpeg;webp) or a table / "
         "parquet column (default image, jpg ...).")]
TextKey = Annotated[Optional[str], typer.Option(
    "--text-key", rich_help_panel=DATA_PANEL, show_default=False,
    help="Caption field: a shard member extension or a field of its json member (default txt), or a "
         "table / parquet column (default text or caption).")]
IdKey = Annotated[Optional[str], typer.Option(
    "--id-key", rich_help_panel=DATA_PANEL, show_default=False,
    help="Record id: a field of a shard's json member (default the sample key, __key__) or a table / "
         "parquet column (default id).")]
DataRoot = Annotated[Optional[Path], typer.Option(
    "--data-root", rich_help_panel=DATA_PANEL, show_default=False,
    help="Folder holding the benchmark in its published layout. Default: $ECLIP_DATA/<dataset> "
         "or ~/.cache/eclip/data/<dataset>.")]
Split = Annotated[str, typer.Option(
    "--split", rich_help_panel=DATA_PANEL,
    help="train | val | test (N24News's 'dev' is accepted for val); all for a release that has no split "
         "(VisualNews's origin/data.json, N24News's nytimes_dataset.json).")]
ImageFolder = Annotated[Optional[str], typer.Option(
    "--image-folder", rich_help_panel=DATA_PANEL, metavar="NAME", show_default=False,
    help="A benchmark's image folder where its layout offers a choice: GoodNews reads images/ (the originals) "
         "unless this says resized (the 256x256 copies of its resize.py, then for every image). "
         "N24News: imgs or images.")]
Explanations = Annotated[Optional[Path], typer.Option(
    "--explanations", rich_help_panel=DATA_PANEL, show_default=False,
    help="Explanation cache written by `eclip explain` (JSONL), or the EntityCLIP authors' "
         "CapDsc_mistral_{split}.json (one JSON object: image file name -> explanation).")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")]


def columns(image_key=None, text_key=None, id_key=None):
    """--image-key / --text-key / --id-key for the readers; None when none is given."""
    from eclip.data.shards import Columns
    return Columns.given(image_key, text_key, id_key)


def model_spec(model, pretrained, checkpoint, device, precision, seed=None):
    """Bundle the model options for the library (cheap: no torch import)."""
    from eclip.config import ModelSpec
    return ModelSpec(model=model, pretrained=pretrained, checkpoint=str(checkpoint) if checkpoint else None,
                     device=device, precision=getattr(precision, "value", precision), seed=seed)


@contextlib.contextmanager
def user_errors():
    """Turn EclipError into one line on stderr and its exit code; never a traceback."""
    try:
        yield
    except EclipError as e:
        sys.stderr.write(f"eclip: error: {e}\n")
        sys.stderr.flush()  # click.testing reads its buffer without flushing it
        raise typer.Exit(e.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("eclip: interrupted\n")
        raise typer.Exit(130)
