"""`eclip export`: a model as the folder another tool reads, one format per tool family.

- open-clip (eclip.exporters.openclip): open_clip's `local-dir:` / `hf-hub:` layout; also what
  CLIP_benchmark and clip-retrieval load;
- hf (eclip.exporters.hf): a transformers CLIPModel + CLIPProcessor folder;
- onnx (eclip.exporters.onnx): image and text graphs, tokenizer.json and preprocess.json, for
  onnxruntime without eclip or torch.

Every folder also gets a model card (eclip.exporters.card). With `wise_ft` the weights are first
interpolated with the model the run started from (eclip.exporters.wise_ft).

The folder is written under a temporary name beside OUTPUT (.NAME.PID.*.tmp) and renamed into
place once whole: a failed or killed export leaves no half-written OUTPUT, and the next export to
the same OUTPUT removes what a killed one left.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from eclip.atomic import process_alive
from eclip.errors import EclipError

FORMATS = ("open-clip", "hf", "onnx")


def check_output(output) -> Path:
    """OUTPUT must not exist, or be an empty folder; its parent must be creatable."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise EclipError(f"--output {output}: exists and is not a folder")
    if output.is_dir() and any(output.iterdir()):
        raise EclipError(f"--output {output}: folder exists and is not empty; choose a new folder")
    return output


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise EclipError(f"--format {fmt}: unknown format; one of {', '.join(FORMATS)}")
    return fmt


def export(spec, output, fmt: str = "open-clip", *, license: str = "other", wise_ft: float | None = None,
           base=None) -> dict:
    """Write the model `spec` names (eclip.config.ModelSpec) into the folder `output` in format `fmt`.

    `wise_ft` (0..1): export (1 - wise_ft) * base + wise_ft * model, base = `base` (a ModelSpec) or
    the model the checkpoint's run started from. -> a summary (files, the open_clip name, commands).
    """
    from eclip.model.source import resolve_source
    check_format(fmt)
    output = check_output(output)
    source = resolve_source(spec)                 # input errors first, before torch is imported
    base_spec = None
    if wise_ft is not None:
        from eclip.exporters.wise_ft import base_for, check_alpha
        check_alpha(wise_ft)
        base_spec = base_for(spec, base)
    from eclip.console import note
    from eclip.model.factory import load_inference_model
    spec = replace(spec, device="cpu", precision="fp32")
    model = load_inference_model(spec, source=source)
    if base_spec is not None:
        from eclip.exporters.wise_ft import interpolate
        note(f"eclip: WiSE-FT alpha {wise_ft}: (1 - alpha) * base + alpha * this model")
        interpolate(model, load_inference_model(replace(base_spec, device="cpu", precision="fp32")), wise_ft)
    writer = _writer(fmt)
    writer.check(model)                           # a tower the format cannot hold: before anything is written
    parent = output.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned(parent, output.name)
        work = Path(tempfile.mkdtemp(prefix=f".{output.name}.{os.getpid()}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise EclipError(f"--output {output}: cannot write there ({e.strerror or e})") from None
    try:
        facts = writer.write(model, work, output.absolute())
        from eclip.exporters.card import write_card
        facts.update(format=fmt, wise_ft=wise_ft, base=_spec_dict(base_spec) if base_spec else None)
        write_card(work, model, facts, license=license)
        if output.is_dir():
            output.rmdir()                        # empty (checked above); rename will not replace it otherwise
        os.rename(work, output)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    files = sorted(p.name for p in output.iterdir())
    return {"output": str(output), "files": files, **facts, "commands": _commands(facts, output)}


def remove_abandoned(parent: Path, name: str) -> None:
    """Temporary folders of earlier exports to `name` whose process is gone (killed): removed."""
    for folder in parent.glob(f".{name}.*.tmp"):
        pid = folder.name[len(name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)




def _writer(fmt: str):
    if fmt == "open-clip":
        from eclip.exporters import openclip as writer
    elif fmt == "hf":
        from eclip.exporters import hf as writer
    else:
        from eclip.exporters import onnx as writer
    return writer


def _spec_dict(spec) -> dict:
    return {k: v for k, v in vars(spec).items() if k in ("model", "pretrained", "checkpoint", "seed") and v is not None}


def _commands(facts: dict, output: Path) -> dict:
    """Ready-to-run commands for the tools that read this folder."""
    folder = str(output.absolute())
    commands = {"upload": upload_command(folder)}
    if facts["format"] == "open-clip":
        from eclip.exporters.openclip import tool_commands
        commands.update(tool_commands(facts, folder))
    return commands


def upload_command(folder: str) -> str:
    """The installed huggingface_hub's CLI command that uploads the folder (`hf` since 0.34,
    `huggingface-cli` before)."""
    try:
        from importlib.metadata import version
        major, minor = (int(x) for x in version("huggingface_hub").split(".")[:2])
        tool = "hf" if (major, minor) >= (0, 34) else "huggingface-cli"
    except Exception:    # not installed: the current name
        tool = "hf"
    return f"{tool} upload YOUR-NAME/{Path(folder).name} {folder} ."
