"""Hugging Face text towers (open_clip's `hf_model_name`): where their files come from.

A model config names the tower by folder or hub id. A relative folder is looked for next to the
config file first, then in the working directory; anything else is a hub id, which must be in the
local cache unless the hub is reachable (one line at once instead of a minute of retries).

A checkpoint carries the tower's small files (config.json and the tokenizer, ~1 MB) in its
header, so it rebuilds without the original folder or the hub: the weights are in the checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from eclip.errors import EclipError
from eclip.model.hub import hub_file_available

NAME_KEYS = ("hf_model_name", "hf_tokenizer_name")
HEADER_KEY = "hf_text_files"
# the only files a header may carry: a text tower's config and its tokenizer's text files (so also at
# most this many); anything else (a path, "..", "", a script) is refused before anything is written
TOWER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "chat_template.jinja",
               "chat_template.json", "generation_config.json")
MAX_TOWER_BYTES = 32 << 20   # all of them together; MiniLM's are 0.7 MB, a 250,000-token tokenizer.json ~17 MB


def is_hf_text(clip_cfg: dict) -> bool:
    return bool(clip_cfg.get("text_cfg", {}).get("hf_model_name"))


def resolve_names(clip_cfg: dict, config_dir: Path | None, what: str) -> dict:
    """The config with each HF folder made absolute; EclipError when a name is neither a folder here
    nor a hub id that can be had (cached, or the hub reachable)."""
    text = dict(clip_cfg.get("text_cfg", {}))
    for key in NAME_KEYS:
        name = text.get(key)
        if not name:
            continue
        given = Path(name).expanduser()
        candidates = [given]
        if config_dir is not None and not given.is_absolute():
            candidates.insert(0, config_dir / given)
        folder = next((c for c in candidates if c.is_dir()), None)
        where = "next to the config and in the working directory" if config_dir else "in the working directory"
        if folder is not None:
            text[key] = str(folder.resolve())
        elif given.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
            raise EclipError(f"{what}: text_cfg.{key} {name}: no such folder (looked {where})")
        else:
            wanted = ["config.json"] if key == "hf_model_name" else ["tokenizer_config.json", "tokenizer.json"]
            if not hub_file_available(name, wanted):
                raise EclipError(f"{what}: text_cfg.{key} {name} is neither a folder here (looked {where}) nor "
                                 f"in the local Hugging Face cache, and the hub is unreachable (offline?); "
                                 f"point it at the model's folder")
    return {**clip_cfg, "text_cfg": text}


def tower_files(model) -> dict:
    """{file name: text} that rebuild the model's HF text tower and tokenizer without weights; {} for
    other towers, or when the tokenizer needs a binary file (then the folder must stay reachable)."""
    from open_clip.hf_model import HFTextEncoder
    tower, tokenizer = getattr(model.clip, "text", None), getattr(model.tokenizer, "tokenizer", None)
    if not isinstance(tower, HFTextEncoder) or tokenizer is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        tower.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {}
        for path in sorted(Path(tmp).iterdir()):
            if path.name not in TOWER_FILES:
                continue
            try:
                files[path.name] = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                return {}
    return files if {"config.json", "tokenizer.json"} <= set(files) else {}


def tower_files_problem(files) -> str | None:
    """What is wrong with a header's {file name: text}, or None: checked whole before anything is written."""
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        return "expected a JSON object of file names and their texts"
    odd = sorted(name for name in files if name not in TOWER_FILES)
    if odd:
        shown = ", ".join(repr(name[:40]) for name in odd[:3]) + (f" and {len(odd) - 3} more" if len(odd) > 3 else "")
        return f"file names other than a text tower's config and tokenizer files ({shown})"
    size = sum(len(text.encode("utf-8", "surrogatepass")) for text in files.values())
    if size > MAX_TOWER_BYTES:
        return f"{size / 2**20:.0f} MB of files, more than a tokenizer needs ({MAX_TOWER_BYTES >> 20} MB at most)"
    return None


def tower_folder(files: dict) -> Path:
    """The files written once into a folder named by their content ($ECLIP_CACHE/hf-text/<sha>; a fresh
    private temporary folder, removed at exit, when the cache is not writable)."""
    from eclip.config import eclip_cache_dir
    problem = tower_files_problem(files)
    if problem:
        raise EclipError(f"eclip header field {HEADER_KEY}: {problem}")
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
    try:
        return _write_once(eclip_cache_dir() / "hf-text" / digest, files)
    except OSError:
        import atexit
        import shutil
        folder = Path(tempfile.mkdtemp(prefix="eclip-hf-text-"))   # mode 0700, a name nobody can guess
        atexit.register(shutil.rmtree, folder, True)
        return _write_once(folder, files)


def _write_once(folder: Path, files: dict) -> Path:
    from eclip.atomic import atomic_path
    for name, text in files.items():
        if not (folder / name).is_file() or (folder / name).read_text(encoding="utf-8") != text:
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(folder / name) as tmp:
                Path(tmp).write_text(text, encoding="utf-8")
    return folder


def rebuild_config(clip_cfg: dict, meta: dict, path) -> dict:
    """The open_clip config that rebuilds a checkpoint's HF text tower: from the files in its header
    (no weights loaded: they are in the checkpoint), else from the folders its config names."""
    text = dict(clip_cfg["text_cfg"], hf_model_pretrained=False)
    if meta.get(HEADER_KEY):
        from eclip.checkpoint import header_json
        try:
            files = header_json(meta[HEADER_KEY])
        except ValueError as e:
            raise EclipError(f"{path}: eclip header field {HEADER_KEY}: not usable JSON ({e})") from None
        problem = tower_files_problem(files)
        if problem:
            raise EclipError(f"{path}: eclip header field {HEADER_KEY}: {problem}")
        folder = str(tower_folder(files))
        return {**clip_cfg, "text_cfg": {**text, "hf_model_name": folder, "hf_tokenizer_name": folder}}
    for key in NAME_KEYS:
        name = text.get(key)
        if name and Path(name).is_absolute() and not Path(name).is_dir():
            raise EclipError(f"{path}: its text tower is the Hugging Face model in {name} (text_cfg.{key}), "
                             f"which is not on this machine; put that folder there (config.json and the "
                             f"tokenizer files suffice: the weights are in the checkpoint)")
    return resolve_names({**clip_cfg, "text_cfg": text}, None, str(path))
