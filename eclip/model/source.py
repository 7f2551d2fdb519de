"""What model options point at, resolved without importing torch or open_clip.

Every input error about a model (a missing or foreign checkpoint, a folder given as one, an
unknown architecture or tag, weights that are not cached while the hub is unreachable) is found
here, in milliseconds, before any engine loads. Both engines then start from the same
`ModelSource`: the torch builder (eclip.model.factory) and the ONNX export cache
(eclip.runtime.onnx_cache), whose key is `ModelSource.key()`.

open_clip's pretrained-tag table is Python code in open_clip/pretrained.py, not data. It is
read here by running that one file detached from its package (its optional torch and
huggingface_hub imports blocked, which it tolerates), so the table is always the installed
one; tests/test_source.py compares it with open_clip's own `get_pretrained_cfg`.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.machinery
import json
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

from eclip.config import DEFAULT_MODEL, DEFAULT_PRETRAINED
from eclip.errors import EclipError
from eclip.model.hub import cached_hub_file, hub_file_available, hub_reachable
HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")   # open_clip.constants
_DETACHED = "_eclip_open_clip_tables"


@dataclass
class ModelSource:
    """kind: checkpoint | file | tag | repo (hf-hub: / local-dir:) | random. `weights`: the local file holding the weights
    (None for random weights, or a tag the hub will serve). `identity`: what EntityCLIP.source
    records (the model as the user named it)."""
    kind: str
    arch: str
    weights: str | None = None
    tag: str | None = None
    tag_cfg: dict = field(default_factory=dict)
    header: dict | None = None
    identity: dict = field(default_factory=dict)
    clip_config: dict | None = None    # the open_clip model config, when known without the hub

    def key(self) -> str:
        """Content-addressed name of this model for caches: the architecture (a config file by
        its bytes), the weights file by real path, size, mtime and inode (a rewritten or replaced
        file gets a new key), and every identity field that is not a path (a seed, say)."""
        material = {k: v for k, v in self.identity.items() if k not in ("model", "pretrained", "checkpoint",
                                                                         "checkpoint_sha256", "model_sha256")}
        material.update(kind=self.kind, arch=_arch_fingerprint(self.arch), tag=self.tag,
                        weights=file_fingerprint(self.weights) if self.weights else None)
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]


def file_fingerprint(path) -> dict:
    st = os.stat(path)
    return {"path": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _arch_fingerprint(arch: str):
    if is_config_path(arch):
        return {"config_sha256": hashlib.sha256(Path(arch).read_bytes()).hexdigest()}
    if arch.startswith("local-dir:"):
        folder = Path(arch[len("local-dir:"):])
        return {"local_dir": os.path.realpath(folder),
                "config": file_fingerprint(folder / "open_clip_config.json")}
    return arch


def is_config_path(model: str) -> bool:
    return model.endswith(".json") or (os.path.sep in model and not model.startswith(("hf-hub:", "local-dir:")))


# ---- open_clip's data, read without importing open_clip ------------------------------------

def open_clip_dir() -> Path:
    """The installed open_clip package's folder, found on sys.path without importing it."""
    spec = importlib.machinery.PathFinder.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise EclipError("open_clip is not installed (pip install open_clip_torch)")
    return Path(list(spec.submodule_search_locations)[0])


def builtin_config(name: str) -> dict | None:
    """open_clip's model config for a built-in architecture name, or None."""
    if sys.modules.get("open_clip") is not None:   # configs added at run time (open_clip.add_model_config) count too
        return sys.modules["open_clip"].get_model_config(name)
    return builtin_config_file(name)


def builtin_config_file(name: str) -> dict | None:
    path = open_clip_dir() / "model_configs" / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


@functools.lru_cache(maxsize=1)
def pretrained_table():
    """open_clip's `pretrained` module (get_pretrained_cfg, list_pretrained_tags_by_model, ...).

    Already imported: that one. Otherwise open_clip/pretrained.py runs detached from its
    package, with `safetensors.torch` and `huggingface_hub` (optional imports it guards)
    blocked: ~20 ms instead of importing torch.
    """
    if sys.modules.get("open_clip") is not None:
        return importlib.import_module("open_clip.pretrained")
    package = types.ModuleType(_DETACHED)
    package.__path__ = [str(open_clip_dir())]
    blocked = [name for name in ("safetensors.torch", "huggingface_hub") if name not in sys.modules]
    sys.modules[_DETACHED] = package
    sys.modules.update({name: None for name in blocked})
    try:
        return importlib.import_module(f"{_DETACHED}.pretrained")
    except Exception:   # open_clip changed shape: ask it the slow way
        import open_clip.pretrained
        return open_clip.pretrained
    finally:
        for name in blocked:
            sys.modules.pop(name, None)


def require_hub_file(repo: str, filenames, what: str) -> None:
    if not hub_file_available(repo, filenames):
        raise EclipError(f"{what}: {repo} is not in the local Hugging Face cache and the hub is unreachable "
                         f"(offline?); copy the files to a folder and use local-dir:PATH, or pass "
                         f"--pretrained /path/to/weights.safetensors")


# ---- model options -> ModelSource --------------------------------------------------------

def resolve_source(spec) -> ModelSource:
    """Check model options (eclip.config.ModelSpec) and say where the weights are; EclipError
    naming the option otherwise. Cheap: reads a checkpoint's header, never its tensors."""
    if spec.checkpoint:
        from eclip.checkpoint import read_config
        path = str(spec.checkpoint)
        meta, config = read_config(path)
        from eclip.model.hf_text import is_hf_text, rebuild_config
        if is_hf_text(config.clip_config):   # its text tower's files: in the header, or a folder that must exist
            rebuild_config(config.clip_config, meta, path)
        return ModelSource("checkpoint", config.clip_name, weights=path, header=meta,
                           identity=checkpoint_source(path, config.clip_name), clip_config=config.clip_config)
    arch = spec.model or DEFAULT_MODEL
    weights = spec.pretrained
    if spec.model is None and weights is None:
        weights = DEFAULT_PRETRAINED
    name, clip_config = check_architecture(arch)
    identity = model_source(spec)
    if arch.startswith(("hf-hub:", "local-dir:")) and (weights is None or weights.lower() == "none"):
        # the weights come with the repo or folder
        return ModelSource("repo", arch, identity=identity, clip_config=clip_config)
    if weights is None or weights.lower() == "none":
        return ModelSource("random", arch, identity=identity, clip_config=clip_config)
    if Path(weights).is_file():
        from eclip.model.weights import check_weights_file
        check_weights_file(weights)        # no pickle, no malformed file reaches open_clip
        return ModelSource("file", arch, weights=weights, identity=identity, clip_config=clip_config)
    if Path(weights).is_dir():
        raise EclipError(f"--pretrained {weights}: is a folder; give the weights file inside it "
                         f"(.safetensors, .bin or .pt)")
    table = pretrained_table()
    tag_cfg = table.get_pretrained_cfg(name, weights)
    if not tag_cfg:
        if any(c in weights for c in "/\\."):
            raise EclipError(f"--pretrained {weights}: no such weights file")
        tags = table.list_pretrained_tags_by_model(name)
        raise EclipError(f"--pretrained {weights}: not a known tag for {name} "
                         f"(known: {', '.join(tags) or 'none'}) and not a file")
    local = None
    if tag_cfg.get("hf_hub"):
        repo, fname = os.path.split(tag_cfg["hf_hub"])
        local = cached_hub_file(repo, [fname] if fname else HF_WEIGHT_FILES)
    if local is None and tag_cfg.get("url"):
        candidate = Path("~/.cache/clip").expanduser() / os.path.basename(tag_cfg["url"])
        local = str(candidate) if candidate.is_file() else None
    if local is None and not hub_reachable():
        raise EclipError(
            f"--pretrained {weights}: weights for {name} are not in the local cache and the model hub is "
            f"unreachable (offline?); download them where the hub is reachable, pass a local file with "
            f"--pretrained /path/to/weights.safetensors, or use random weights with --pretrained none "
            f"(--model also takes an open_clip model-config JSON)")
    return ModelSource("tag", arch, weights=local, tag=weights, tag_cfg=tag_cfg, identity=identity,
                       clip_config=clip_config)


def checkpoint_source(path, clip_name: str) -> dict:
    """EntityCLIP.source of a checkpoint: named by its absolute path; identity() adds its sha256."""
    return {"model": clip_name, "pretrained": None, "checkpoint": os.path.abspath(str(path)),
            "checkpoint_sha256": None}


def random_weights(spec) -> bool:
    """No weights anywhere: an architecture name or config file with --pretrained none (or none given).
    hf-hub: and local-dir: models bring their own weights."""
    if spec.checkpoint or spec.model is None or spec.model.startswith(("hf-hub:", "local-dir:")):
        return False
    return spec.pretrained is None or str(spec.pretrained).lower() == "none"


def model_source(spec) -> dict:
    """What model options name, the same from any folder (no checkpoint: that is named by its
    sha256): files by absolute path, and a model-config file also by the sha256 of its bytes
    (`model_sha256`), so a relative path, an absolute one and a copy elsewhere are one model.
    Cheap: nothing is built."""
    arch, weights = spec.model or DEFAULT_MODEL, spec.pretrained
    if spec.model is None and weights is None:
        weights = DEFAULT_PRETRAINED
    model, model_sha256 = arch, None
    if arch.startswith("local-dir:") and os.path.isdir(arch[len("local-dir:"):]):
        model = "local-dir:" + os.path.realpath(arch[len("local-dir:"):])
    elif os.path.isfile(arch):
        model = os.path.realpath(arch)
        model_sha256 = hashlib.sha256(Path(arch).read_bytes()).hexdigest()
    if weights and os.path.isfile(str(weights)):
        weights = os.path.realpath(str(weights))
    # random weights are the seed's: another seed, another model (identity() keeps it, so stores compare it)
    seed = (spec.seed if spec.seed is not None else 0) if random_weights(spec) else None
    return {"model": model, "model_sha256": model_sha256, "pretrained": weights, "checkpoint_sha256": None,
            "seed": seed}


def check_architecture(model: str) -> tuple[str, dict | None]:
    """EclipError unless `model` names an architecture (and its Hugging Face text tower, if any, can
    be had); -> (the name open_clip knows it by, its config when known without the hub)."""
    from eclip.model.hf_text import is_hf_text, resolve_names
    if is_config_path(model):
        path = Path(model)
        if not path.is_file():
            raise EclipError(f"--model {model}: no such model-config file")
        try:
            cfg = json.loads(path.read_text())
            cfg = cfg.get("model_cfg", cfg)
            assert "vision_cfg" in cfg and "text_cfg" in cfg and "embed_dim" in cfg
        except (ValueError, AssertionError, AttributeError):
            raise EclipError(f"--model {model}: not an open_clip model config (needs embed_dim, vision_cfg, "
                             f"text_cfg)") from None
        if is_hf_text(cfg):
            resolve_names(cfg, path.parent, f"--model {model}")
        return model, cfg
    if model.startswith("hf-hub:"):
        require_hub_file(model[len("hf-hub:"):], ["open_clip_config.json"], f"--model {model}")
        return model, None
    if model.startswith("local-dir:"):
        if not (Path(model[len("local-dir:"):]) / "open_clip_config.json").is_file():
            raise EclipError(f"--model {model}: folder has no open_clip_config.json")
        return model, None
    name = model.replace("/", "-")
    cfg = builtin_config(name)
    if cfg is None:
        raise EclipError(f"--model {model}: unknown architecture (see `python -c \"import open_clip; "
                         f"print(open_clip.list_models())\"`), or pass a model-config JSON file")
    if is_hf_text(cfg):      # e.g. roberta-ViT-B-32: its text tower comes from the hub
        resolve_names(cfg, None, f"--model {model}")
    return name, cfg
