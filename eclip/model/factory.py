"""The front door: `load_model` turns model options into an EntityCLIP, offline-safe.

Accepted: an open_clip architecture name, `hf-hub:org/repo`, `local-dir:PATH`, or a model-config
JSON file; weights from a pretrained tag (only if it is in the local cache or the hub is reachable:
never a minute of retries), a local weights file, or an eclip checkpoint.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path

from eclip.config import (DEFAULT_MODEL, DEFAULT_PRETRAINED, EntityCLIPConfig, ExpertConfig, LossConfig,
                          ModelSpec)
from eclip.errors import EclipError
from eclip.model.hf_text import is_hf_text, resolve_names
from eclip.model.hub import cached_hub_file, hub_file_available, hub_offline_if_cached, hub_reachable
from eclip.model.text_limit import CappedTokenizer


def resolve_device(device: str | None) -> str:
    import torch
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def register_config(cfg: dict) -> str:
    """Make a model-config dict known to open_clip under a content-derived name; return the name."""
    import open_clip
    text = json.dumps(cfg, sort_keys=True)
    name = "eclip-" + hashlib.sha256(text.encode()).hexdigest()[:12]
    if name not in open_clip.list_models():
        folder = Path(tempfile.gettempdir()) / f"eclip-configs-{os.getuid()}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.json"
        path.write_text(text)
        open_clip.add_model_config(path)
    return name


def resolve_architecture(model: str) -> tuple[str, dict, str]:
    """-> (name open_clip builds it by, full model config, tokenizer name)."""
    import open_clip
    if model.endswith(".json") or os.path.sep in model and not model.startswith(("hf-hub:", "local-dir:")):
        path = Path(model)
        if not path.is_file():
            raise EclipError(f"--model {model}: no such model-config file")
        try:
            cfg = json.loads(path.read_text())
            cfg = cfg.get("model_cfg", cfg)
            assert "vision_cfg" in cfg and "text_cfg" in cfg and "embed_dim" in cfg
        except (ValueError, AssertionError):
            raise EclipError(f"--model {model}: not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
        if is_hf_text(cfg):
            cfg = resolve_names(cfg, path.parent, f"--model {model}")
        name = register_config(cfg)
        return name, cfg, name
    if model.startswith("hf-hub:"):
        _require_hub_file(model[len("hf-hub:"):], ["open_clip_config.json"], f"--model {model}")
        with hub_offline_if_cached(True):
            cfg = open_clip.get_model_config(model)
        return model, cfg, model
    if model.startswith("local-dir:"):
        folder = Path(model[len("local-dir:"):])
        if not (folder / "open_clip_config.json").is_file():
            raise EclipError(f"--model {model}: folder has no open_clip_config.json")
        return model, open_clip.get_model_config(model), model
    name = model.replace("/", "-")
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise EclipError(f"--model {model}: unknown architecture (see `python -c \"import open_clip; "
                         f"print(open_clip.list_models())\"`), or pass a model-config JSON file")
    if is_hf_text(cfg):      # e.g. roberta-ViT-B-32: its text tower comes from the hub
        resolve_names(cfg, None, f"--model {model}")
    return name, cfg, name


def _require_hub_file(repo: str, filenames, what: str) -> None:
    if not hub_file_available(repo, filenames):
        raise EclipError(f"{what}: {repo} is not in the local Hugging Face cache and the hub is unreachable "
                         f"(offline?); copy the files to a folder and use local-dir:PATH, or pass "
                         f"--pretrained /path/to/weights.safetensors")


def resolve_pretrained(name: str, pretrained: str | None) -> tuple[str | None, dict]:
    """-> (weights file or tag to hand to open_clip, the tag's config). Fails at once when offline."""
    import open_clip
    from open_clip.pretrained import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
    if pretrained is None or pretrained.lower() == "none":
        return None, {}
    if Path(pretrained).is_file():
        return pretrained, {}
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not tag_cfg:
        if any(c in pretrained for c in "/\\."):
            raise EclipError(f"--pretrained {pretrained}: no such weights file")
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise EclipError(f"--pretrained {pretrained}: not a known tag for {name} "
                         f"(known: {', '.join(tags) or 'none'}) and not a file")
    local = None
    if tag_cfg.get("hf_hub"):
        repo, fname = os.path.split(tag_cfg["hf_hub"])
        local = cached_hub_file(repo, [fname] if fname else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME])
    if local is None and tag_cfg.get("url"):
        candidate = Path("~/.cache/clip").expanduser() / os.path.basename(tag_cfg["url"])
        local = str(candidate) if candidate.is_file() else None
    if local is None and not hub_reachable():
        raise EclipError(
            f"--pretrained {pretrained}: weights for {name} are not in the local cache and the model hub is "
            f"unreachable (offline?); download them where the hub is reachable, or pass a local file with "
            f"--pretrained /path/to/weights.safetensors (or a model-config JSON with --pretrained none)")
    return local or pretrained, tag_cfg


def load_model(spec: ModelSpec | None = None, *, model=None, pretrained=None, checkpoint=None, device=None,
               precision="fp32", seed=None, experts: ExpertConfig | None = None, loss: LossConfig | None = None):
    """Build an EntityCLIP from model options (see README, "Python API")."""
    spec = spec or ModelSpec(model=model, pretrained=pretrained, checkpoint=checkpoint, device=device,
                             precision=precision, seed=seed)
    device = resolve_device(spec.device)
    if spec.checkpoint:
        from eclip.checkpoint import load_checkpoint
        m = load_checkpoint(spec.checkpoint, device=device)
        return _cast(m, spec.precision)
    arch, weights = spec.model or DEFAULT_MODEL, spec.pretrained
    if spec.model is None and weights is None:
        weights = DEFAULT_PRETRAINED
    name, clip_cfg, tokenizer = resolve_architecture(arch)
    file_or_tag, tag_cfg = resolve_pretrained(name, weights)
    user_file = weights if weights and Path(str(weights)).is_file() else None
    if user_file:
        from eclip.model.weights import check_weights_file
        check_weights_file(user_file)        # no pickle, no malformed file reaches open_clip
    source = model_source(spec)
    seed = source["seed"] if source["seed"] is not None else spec.seed
    with seeded(seed):   # random weights are drawn from the seed: the same options give the same model
        m = build(name, clip_cfg, tokenizer, experts or ExpertConfig(), loss or LossConfig(),
                  pretrained=None if user_file else file_or_tag, tag_cfg=tag_cfg, device=device)
    if user_file:
        from eclip.model.weights import load_weights_file
        load_weights_file(m.clip, user_file, arch)
    m.source = source
    return _cast(m, spec.precision)


def random_weights(spec: ModelSpec) -> bool:
    """No weights anywhere: an architecture name or config file with --pretrained none (or none given).
    hf-hub: and local-dir: models bring their own weights."""
    if spec.checkpoint or spec.model is None or spec.model.startswith(("hf-hub:", "local-dir:")):
        return False
    return spec.pretrained is None or str(spec.pretrained).lower() == "none"


@contextlib.contextmanager
def seeded(seed: int | None):
    """Draw from torch's CPU generator seeded with `seed` (open_clip initialises on the CPU), then give
    the caller's random stream back untouched. None: nothing changes."""
    if seed is None:
        yield
        return
    import torch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def model_source(spec: ModelSpec) -> dict:
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


def build(name, clip_cfg, tokenizer_name, experts, loss, pretrained=None, tag_cfg=None, device="cpu",
          preprocess_cfg=None):
    """Create the open_clip model, its eval transform and tokenizer, and wrap them in EntityCLIP."""
    import logging

    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from eclip.model.entityclip import EntityCLIP
    tag_cfg = tag_cfg or {}
    quick_gelu = bool(tag_cfg.get("quick_gelu")) and not clip_cfg.get("quick_gelu", False)
    pp = preprocess_cfg or {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
    cached = pretrained is not None and Path(str(pretrained)).is_file()
    logging.getLogger().setLevel(logging.ERROR)   # open_clip logs "randomly initialised" at WARNING
    # open_clip ignores text_cfg.hf_model_pretrained unless told: a checkpoint brings its own text weights
    text_weights = clip_cfg.get("text_cfg", {}).get("hf_model_pretrained", True)
    try:
        with hub_offline_if_cached(cached or name.startswith("local-dir:")), quiet_transformers():
            clip = open_clip.create_model(name, pretrained=pretrained, device=device, force_quick_gelu=quick_gelu,
                                          force_preprocess_cfg=pp or None, pretrained_text=text_weights)
            tokenizer = CappedTokenizer(open_clip.get_tokenizer(tokenizer_name))   # no 50 MB caption reaches it
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise EclipError(f"could not build {name} with weights {pretrained}: {first}") from None
    if quick_gelu:
        clip_cfg = {**clip_cfg, "quick_gelu": True}
    preprocess_dict = json.loads(json.dumps(dict(clip.visual.preprocess_cfg)))  # tuples -> lists, as in headers
    preprocess = image_transform_v2(PreprocessCfg(**preprocess_dict), is_train=False)
    config = EntityCLIPConfig(clip_name=name, clip_config=clip_cfg, preprocess=preprocess_dict,
                              tokenizer=tokenizer_name,
                              context_length=clip_cfg.get("text_cfg", {}).get("context_length", 77),
                              experts=replace(experts), loss=replace(loss))
    return EntityCLIP(clip, config, preprocess, tokenizer).to(device)


@contextlib.contextmanager
def quiet_transformers():
    """A Hugging Face text tower loads without transformers' progress bar and load report on stderr
    (e.g. "pooler.dense.weight UNEXPECTED" for a mean-pooled BERT): eclip says what matters itself."""
    from transformers.utils import logging as hf_logging
    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def _cast(m, precision: str):
    import torch
    if precision in ("fp16", "bf16"):
        m.to({"fp16": torch.float16, "bf16": torch.bfloat16}[precision])
    return m
