"""`eclip export`: a model as the folder open_clip, transformers or onnxruntime reads."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from eclip.cli import app
from eclip.cli.options import Checkpoint, Json, Model, Pretrained, Seed, model_spec, user_errors
from eclip.errors import EclipError


HELP = """Write a model (an eclip checkpoint, or any model the model options name) as a folder
another tool reads, with a README.md model card.

\b
Formats:
  open-clip  open_clip_config.json + open_clip_model.safetensors, for
             open_clip's "local-dir:DIR" (hf-hub: once uploaded),
             CLIP_benchmark, clip-retrieval and eclip's --model local-dir:DIR
  hf         transformers CLIPModel + CLIPProcessor (ViT + CLIP text only)
  onnx       image.onnx, text.onnx, tokenizer.json, preprocess.json:
             onnxruntime without eclip or torch (README, "Using your
             model elsewhere")

\b
Examples:
  eclip export run/best.safetensors --output my-model/
  eclip export run/best.safetensors --format hf -o my-model-hf/ --license mit
  eclip export run/best.safetensors --wise-ft 0.5 --output my-model-wise/
  eclip export --model ViT-B-32 --pretrained openai --format onnx -o b32-onnx/

With --wise-ft ALPHA the weights are (1 - ALPHA) * base + ALPHA * fine-tuned (WiSE-FT), base =
the model the checkpoint's run started from, or the one --model/--pretrained name.
OUTPUT must be new (or an empty folder); it appears whole or not at all.
"""


@app.command(help=HELP)
def export(
    checkpoint_file: Annotated[Optional[Path], typer.Argument(
        metavar="[CHECKPOINT]", show_default=False, help="An eclip checkpoint (the same as --checkpoint).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", show_default=False,
                                         help="Folder to write (must not exist, or be empty).")] = None,
    fmt: Annotated[str, typer.Option("--format", metavar="open-clip|hf|onnx",
                                     help="Which tool the folder is for.")] = "open-clip",
    license: Annotated[str, typer.Option(
        "--license", help="The model card's license field (a Hugging Face license id: mit, apache-2.0, ...).")] = "other",
    wise_ft: Annotated[Optional[float], typer.Option(
        "--wise-ft", metavar="ALPHA", show_default=False,
        help="Interpolate with the base model: (1 - ALPHA) * base + ALPHA * fine-tuned (0..1).")] = None,
    model: Model = None,
    pretrained: Pretrained = None,
    checkpoint: Checkpoint = None,
    seed: Seed = None,
    json_: Json = False,
):
    with user_errors():
        from eclip.config import ModelSpec
        from eclip.console import print_json
        from eclip.exporters import export as run
        if output is None:
            raise EclipError("--output DIR is required")
        if checkpoint_file and checkpoint and checkpoint_file != checkpoint:
            raise EclipError(f"{checkpoint_file} and --checkpoint {checkpoint}: give the checkpoint once")
        checkpoint = checkpoint or checkpoint_file
        base = None
        if wise_ft is not None and checkpoint and (model or pretrained):   # the model options name the base
            base = ModelSpec(model=model, pretrained=pretrained, seed=seed)
            spec = model_spec(None, None, checkpoint, "cpu", "fp32")
        else:
            spec = model_spec(model, pretrained, checkpoint, "cpu", "fp32", seed)
        summary = run(spec, output, fmt, license=license, wise_ft=wise_ft, base=base)
        if json_:
            print_json(summary)
        say = lambda line: typer.echo(line, err=True)   # the result itself: not a note ECLIP_QUIET hides
        say(f"eclip: wrote {summary['output']} ({fmt}: {', '.join(summary['files'])})")
        if fmt == "open-clip":
            name = summary.get("open_clip_name")
            say(f"open_clip architecture name for --pretrained {summary['output']}/{summary['weights']}: "
                + (name if name else "none (no built-in config matches; use local-dir:)"))
        for tool, command in summary["commands"].items():
            say(f"  {tool}: {command}")
