"""The open-clip format: the folder open_clip reads with `local-dir:DIR` (and `hf-hub:org/repo`
once uploaded).

open_clip_config.json is {"model_cfg", "preprocess_cfg"}; open_clip_model.safetensors holds the
CLIP towers only (no experts, no matching head), under open_clip's own names. A Hugging Face
text tower also gets its config.json and tokenizer files in the folder: open_clip's tokenizer reads
them from a `local-dir:` folder, and text_cfg.hf_model_name points at the folder (absolute path:
open_clip resolves it from the working directory).

The weights file alone also loads with `--pretrained FILE` beside an architecture name, when one of
open_clip's built-in configs is exactly this model's (`builtin_name`): an OpenAI-initialised
ViT-B-32 is `ViT-B-32-quickgelu` there, and the plain name would silently give other vectors.
"""
from __future__ import annotations

import json
from pathlib import Path

CONFIG = "open_clip_config.json"
WEIGHTS = "open_clip_model.safetensors"


def check(model) -> None:
    """Every open_clip model fits this format."""


def state_dict(model) -> dict:
    """The CLIP towers' tensors, contiguous and unshared (safetensors refuses shared storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.clip.state_dict().items()}


def model_cfg(model, folder: Path | None) -> dict:
    """The open_clip model config to write; a Hugging Face text tower is read from `folder`."""
    from eclip.model.hf_text import is_hf_text
    cfg = json.loads(json.dumps(model.config.clip_config))
    if is_hf_text(cfg) and folder is not None:
        cfg["text_cfg"].update(hf_model_name=str(folder), hf_tokenizer_name=str(folder), hf_model_pretrained=False)
    return cfg


def write(model, work: Path, final: Path) -> dict:
    from safetensors.torch import save_file

    from eclip.model.hf_text import is_hf_text, tower_files
    hf_files = tower_files(model) if is_hf_text(model.config.clip_config) else {}
    for name, text in hf_files.items():
        (work / name).write_text(text, encoding="utf-8")
    cfg = model_cfg(model, final if hf_files else None)
    (work / CONFIG).write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": model.config.preprocess},
                                          indent=2) + "\n")
    save_file(state_dict(model), str(work / WEIGHTS), metadata={"format": "pt"})
    return {"open_clip_name": builtin_name(cfg), "weights": WEIGHTS, "hf_text_files": sorted(hf_files),
            "usage": ["import open_clip",
                      'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:THIS_FOLDER")',
                      'tokenizer = open_clip.get_tokenizer("local-dir:THIS_FOLDER")']}


def _normal(cfg: dict) -> str:
    cfg = dict(cfg)
    if not cfg.get("quick_gelu"):
        cfg.pop("quick_gelu", None)
    return json.dumps(cfg, sort_keys=True)


def builtin_name(cfg: dict) -> str | None:
    """The built-in open_clip architecture whose config is exactly `cfg` (quick_gelu included),
    or None. The `-quickgelu` variant wins only where the config has quick_gelu."""
    from eclip.model.source import open_clip_dir
    wanted = _normal(cfg)
    for path in sorted((open_clip_dir() / "model_configs").glob("*.json")):
        try:
            if _normal(json.loads(path.read_text())) == wanted:
                return path.stem
        except ValueError:
            continue
    return None


def tool_commands(facts: dict, folder: str) -> dict:
    """open_clip, CLIP_benchmark and clip-retrieval commands for an exported folder."""
    name, weights = facts.get("open_clip_name"), f"{folder}/{WEIGHTS}"
    commands = {
        "open_clip": f'open_clip.create_model_and_transforms("local-dir:{folder}")',
        "clip_benchmark": (f"clip_benchmark eval --model_type open_clip --model local-dir:{folder} --pretrained none "
                           f"--dataset mscoco_captions --dataset_root DATA --task zeroshot_retrieval "
                           f"--recall_k 1 5 10 --output result.json"),
    }
    if name:
        commands["open_clip_pretrained"] = f'open_clip.create_model_and_transforms("{name}", pretrained="{weights}")'
        commands["clip_retrieval"] = (f'clip-retrieval inference --input_dataset IMAGES --output_folder EMBEDDINGS '
                                      f'--clip_model "open_clip:{name}/{weights}"')
    else:
        commands["clip_retrieval"] = ("clip-retrieval needs a built-in open_clip architecture name, and no "
                                      "built-in config matches this model's; use `eclip embed --format "
                                      "clip-retrieval` for its index layout")
    return commands
