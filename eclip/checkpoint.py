"""eclip checkpoints: one .safetensors file; its header carries the config that rebuilds the model.

Header metadata (all strings): format="eclip", eclip_version, config=<EntityCLIPConfig as JSON>,
for a Hugging Face text tower hf_text_files=<{file name: text}> (its config.json and tokenizer),
plus anything the caller adds (e.g. training step). Nothing is ever unpickled.

This module reads and writes the file format only; rebuilding a model from a checkpoint is the
model factory's job (eclip.model.factory.load_checkpoint). Reading a header imports neither
torch nor safetensors: the format is an 8-byte length and a JSON header.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from eclip import __version__
from eclip.atomic import atomic_path
from eclip.errors import EclipError

FORMAT = "eclip"
MAX_HEADER = 100 << 20   # safetensors' own limit on the JSON header
MAX_DEPTH = 32           # JSON nesting allowed in a header; an eclip config is about 5 levels deep


def header_json(text):
    """json.loads for header text, refusing nesting deeper than MAX_DEPTH with a ValueError (100,000
    levels would otherwise raise RecursionError, or pass the parser and overflow later code)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"nested more than {MAX_DEPTH} levels deep") from None
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return value


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


def missing_checkpoint(path: Path) -> EclipError:
    """The error for a --checkpoint that is not a file: a folder (a run folder, say) is named as
    one, with the checkpoint inside it when there is one."""
    if path.is_dir():
        inside = next((path / n for n in ("best.safetensors", "last.safetensors") if (path / n).is_file()), None)
        hint = f"; did you mean {inside}?" if inside else " (no best.safetensors inside)"
        return EclipError(f"{path}: is a folder, not a checkpoint file{hint}")
    return EclipError(f"{path}: no such checkpoint file")


def read_safetensors_header(path) -> dict:
    """The JSON header of a .safetensors file (tensor entries and "__metadata__"), checked against
    the file's size so a truncated file is refused; ValueError otherwise."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError("file too short")
        n = struct.unpack("<Q", prefix)[0]
        if n > min(MAX_HEADER, size - 8):
            raise ValueError("header length out of range")
        header = header_json(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    if max(ends, default=0) > size - 8 - n:
        raise ValueError(f"truncated: tensors end at byte {max(ends) + 8 + n}, file has {size}")
    return header


def read_header(path) -> dict:
    """The checkpoint's metadata, validated; EclipError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise missing_checkpoint(path)
    try:
        meta = read_safetensors_header(path).get("__metadata__") or {}
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise EclipError(f"{path}: not a readable .safetensors file ({str(e).splitlines()[0][:120]})") from None
    if meta.get("format") != FORMAT or "config" not in meta:
        raise EclipError(f"{path}: not an eclip checkpoint (no eclip header); for plain open_clip weights "
                         f"use --pretrained FILE")
    return meta


def read_config(path):
    """-> (header metadata, EntityCLIPConfig): everything that rebuilds the model, type-checked."""
    from eclip.config import EntityCLIPConfig, config_problem
    meta = read_header(path)
    try:
        raw = header_json(meta["config"])
    except ValueError as e:
        raise EclipError(f"{path}: the eclip header's config is not valid JSON ({e})") from None
    problem = config_problem(raw)
    if problem:
        raise EclipError(f"{path}: eclip header field {problem}")
    return meta, EntityCLIPConfig.from_dict(raw)
