"""eclip checkpoints: one .safetensors file; its header carries the config that rebuilds the model.

Header metadata (all strings): format="eclip", eclip_version, config=<EntityCLIPConfig as JSON>,
for a Hugging Face text tower hf_text_files=<{file name: text}> (its config.json and tokenizer),
plus anything the caller adds (e.g. training step). Nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from eclip import __version__
from eclip.atomic import atomic_path
from eclip.errors import EclipError

FORMAT = "eclip"


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(model, path, extra: dict | None = None) -> Path:
    """Write backbone + experts + head weights and the config, atomically."""
    from safetensors.torch import save_model
    from eclip.model.hf_text import HEADER_KEY, tower_files
    meta = {"format": FORMAT, "eclip_version": __version__, "config": json.dumps(model.config.to_dict())}
    hf_files = tower_files(model)      # a Hugging Face text tower's config and tokenizer (~1 MB)
    if hf_files:
        meta[HEADER_KEY] = json.dumps(hf_files)
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    path = Path(path)
    with atomic_path(path) as tmp:
        save_model(model, str(tmp), metadata=meta)
    return path


def read_header(path) -> dict:
    """The checkpoint's metadata, validated; EclipError naming the file otherwise."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise EclipError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for truncated / garbage files
        raise EclipError(f"{path}: not a readable .safetensors file ({str(e).splitlines()[0][:120]})")
    if meta.get("format") != FORMAT or "config" not in meta:
        raise EclipError(f"{path}: not an eclip checkpoint (no eclip header); for plain open_clip weights "
                         f"use --pretrained FILE")
    return meta


def load_checkpoint(path, device: str = "cpu"):
    """Rebuild the model from the header alone and load the weights (strict)."""
    from safetensors.torch import load_model

    from eclip.config import EntityCLIPConfig, config_problem
    from eclip.model.factory import build, register_config
    from eclip.model.hf_text import HEADER_KEY, is_hf_text, rebuild_config
    meta = read_header(path)
    try:
        raw = json.loads(meta["config"])
    except ValueError as e:
        raise EclipError(f"{path}: the eclip header's config is not valid JSON ({e})") from None
    problem = config_problem(raw)
    if problem:
        raise EclipError(f"{path}: eclip header field {problem}")
    config = EntityCLIPConfig.from_dict(raw)
    clip_config = config.clip_config
    if is_hf_text(clip_config):
        clip_config = rebuild_config(clip_config, meta, path)
    name = register_config(clip_config)   # the header alone rebuilds it: no hub, no folder
    hub_or_dir = config.tokenizer.startswith(("hf-hub:", "local-dir:")) and HEADER_KEY not in meta
    tokenizer = config.tokenizer if hub_or_dir else name
    try:
        model = build(name, clip_config, tokenizer, config.experts, config.loss, device="cpu",
                      preprocess_cfg=config.preprocess)
    except Exception as e:   # types were plausible, but open_clip cannot build what the header describes
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise EclipError(f"{path}: the eclip header's config does not build a model ({first})") from None
    model.config = config
    try:
        load_model(model, str(path), strict=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise EclipError(f"{path}: weights do not fit the model its header describes ({first})")
    # the sha256 is computed by identity() when first asked: plain matching never needs it
    model.source = {"model": config.clip_name, "pretrained": None, "checkpoint": os.path.abspath(str(path)),
                    "checkpoint_sha256": None}
    return model.to(device)
