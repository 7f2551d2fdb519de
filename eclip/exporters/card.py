"""The model card: README.md in the Hugging Face format (YAML front matter, then Markdown).

What it says comes from the model and, when the checkpoint sits in an `eclip train` run folder,
from that run's config.json (training data, hyper-parameters) and summary.json (validation and,
when present, test figures). Nothing is made up: a figure the run did not record is not shown.
"""
from __future__ import annotations

import json
from pathlib import Path

LIBRARY = {"open-clip": "open_clip", "hf": "transformers", "onnx": "onnx"}
HYPER = ("epochs", "batch_size", "lr", "weight_decay", "warmup_steps", "grad_accum", "seed", "precision", "eta",
         "lam", "vision_experts", "text_experts", "shared_experts", "no_experts", "lock_image", "lock_text",
         "augment", "select_by")
DATA = ("dataset", "val_dataset", "val_fraction", "explanations", "train_split", "val_split")


def run_folder(model) -> tuple[dict, dict] | None:
    """(config.json, summary.json) of the run whose folder holds the model's checkpoint, or None."""
    checkpoint = (getattr(model, "source", None) or {}).get("checkpoint")
    if not checkpoint:
        return None
    folder = Path(checkpoint).parent
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or "output" not in config:
        return None
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    return config, summary if isinstance(summary, dict) else {}


def _yaml_value(value) -> str:
    return json.dumps(value, ensure_ascii=False)      # JSON scalars and lists are YAML


def front_matter(fmt: str, license: str, tags: list) -> str:
    fields = {"library_name": LIBRARY[fmt], "license": license, "tags": tags,
              "pipeline_tag": "zero-shot-image-classification"}
    return "---\n" + "".join(f"{k}: {_yaml_value(v)}\n" for k, v in fields.items()) + "---\n"


def _table(rows: dict) -> str:
    if not rows:
        return ""
    return "| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows.items())


def _figures(summary: dict) -> dict:
    rows = {}
    for key in ("best_val_rsum", "best_val_loss", "best_epoch", "best_step", "steps", "pairs_seen"):
        if summary.get(key) is not None:
            rows[key] = round(summary[key], 4) if isinstance(summary[key], float) else summary[key]
    for key, value in (summary.get("last_val") or {}).items():
        if isinstance(value, (int, float)) and key not in ("step", "epoch"):
            rows[f"last validation {key}"] = round(value, 4) if isinstance(value, float) else value
    for key, value in (summary.get("test") or {}).items():
        if isinstance(value, (int, float)):
            rows[f"test {key}"] = round(value, 4) if isinstance(value, float) else value
    return rows


def card_text(model, facts: dict, license: str) -> str:
    from eclip import __version__
    fmt = facts["format"]
    tags = ["clip", "eclip", "entity-centric", "image-text-retrieval", LIBRARY[fmt]]
    if facts.get("wise_ft") is not None:
        tags.append("wise-ft")
    cfg = model.config
    name = facts.get("open_clip_name")
    lines = [front_matter(fmt, license, tags), "",
             f"# {cfg.clip_name} fine-tuned with eclip" if run_folder(model) else f"# {cfg.clip_name} (eclip export)",
             "",
             f"A CLIP model exported by eclip {__version__} (`eclip export --format {fmt}`). Inference is plain "
             f"CLIP: L2-normalised image and text vectors, compared by cosine similarity.", ""]
    lines += ["## How to load it", ""] + [f"    {line}" for line in facts.get("usage", [])] + [""]
    if fmt == "open-clip":
        if name:
            lines += [f"The weights file also loads beside the built-in architecture name **`{name}`** "
                      f"(`--model {name} --pretrained {facts['weights']}`); another name gives other vectors.", ""]
        else:
            lines += ["No built-in open_clip architecture has this model's config: load it with `local-dir:` "
                      "(or `hf-hub:` once uploaded).", ""]
        if facts.get("hf_text_files"):
            lines += ["`text_cfg.hf_model_name` in open_clip_config.json points at the folder this was written to; "
                      "after moving or uploading it, set it to the new folder or the text model's Hub id.", ""]
    if fmt == "hf":
        lines += ["transformers' centre crop starts at floor((W - size) / 2), open_clip's at round((W - size) / 2): "
                  "where the resized image's margin is odd the crops are one pixel apart.", ""]
    if fmt == "onnx":
        lines += ["preprocess.json says how to make the inputs; both graphs return L2-normalised vectors.", ""]
    source = dict(getattr(model, "source", {}) or {})
    lines += ["## Model", "", _table({"architecture": f"`{cfg.clip_name}`", "embedding size": cfg.clip_config["embed_dim"],
                                      "image size": cfg.preprocess.get("size"),
                                      "context length": cfg.context_length,
                                      "weights from": f"`{source.get('checkpoint') or source.get('pretrained') or source.get('model')}`"})]
    if facts.get("wise_ft") is not None:
        lines += [f"Weights interpolated with WiSE-FT (Wortsman et al., CVPR 2022): (1 - {facts['wise_ft']}) * base "
                  f"+ {facts['wise_ft']} * fine-tuned, base `{json.dumps(facts.get('base'))}`.", ""]
    run = run_folder(model)
    if run:
        config, summary = run
        lines += ["## Training data", "", _table({k: f"`{config[k]}`" for k in DATA if config.get(k) is not None}),
                  "## Hyper-parameters", "", _table({k: config[k] for k in HYPER if config.get(k) is not None})]
        figures = _figures(summary)
        lines += ["## Results", "",
                  _table(figures) if figures else "The run folder has no summary.json (the run did not finish).",
                  "Figures as the run's summary.json recorded them (rsum = sum of Recall@1/5/10 both ways, %)"
                  + (", for the fine-tuned model, not this interpolation (`eclip evaluate --wise-ft` measures "
                     "that)." if facts.get("wise_ft") is not None else ".") if figures else "", ""]
    lines += ["## Training method", "",
              "EntityCLIP (SIGIR 2025): CLIP fine-tuned with LLM explanations, Multimodal Attentive Experts and a "
              "gated image-text matching loss; the experts and the matching head exist only during training and "
              "are not part of this export.", ""]
    return "\n".join(lines)


def write_card(folder: Path, model, facts: dict, license: str = "other") -> None:
    (Path(folder) / "README.md").write_text(card_text(model, facts, license), encoding="utf-8")
