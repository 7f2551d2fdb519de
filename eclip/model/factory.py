"""The front door: `load_model` turns model options into an EntityCLIP, offline-safe.

Accepted: an open_clip architecture name, `hf-hub:org/repo`, `local-dir:PATH`, or a model-config
JSON file; weights from a pretrained tag (only if it is in the local cache or the hub is reachable:
never a minute of retries), a local weights file, or an eclip checkpoint.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from eclip.config import EntityCLIPConfig, ExpertConfig, LossConfig, ModelSpec
from eclip.errors import EclipError
from eclip.model.hf_text import is_hf_text, resolve_names
from eclip.model.hub import hub_offline_if_cached
from eclip.model.text_limit import CappedTokenizer
from eclip.model.source import (ModelSource, checkpoint_source, is_config_path, model_source,  # noqa: F401
                                random_weights, resolve_source)   # model_source, random_weights: re-exported


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
        # open_clip reads configs from files only: one in a fresh private folder (never a guessable
        # /tmp name another user could plant a link at), gone once read (the registry keeps the config)
        folder = tempfile.mkdtemp(prefix="eclip-config-")
        try:
            path = Path(folder) / f"{name}.json"
            path.write_text(text)
            open_clip.add_model_config(path)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return name


def resolve_architecture(model: str) -> tuple[str, dict, str]:
    """-> (name open_clip builds it by, full model config, tokenizer name). The options were
    checked by eclip.model.source.check_architecture."""
    import open_clip
    if is_config_path(model):
        path = Path(model)
        cfg = json.loads(path.read_text())
        cfg = cfg.get("model_cfg", cfg)
        if is_hf_text(cfg):
            cfg = resolve_names(cfg, path.parent, f"--model {model}")
        name = register_config(cfg)
        return name, cfg, name
    if model.startswith("hf-hub:"):
        with hub_offline_if_cached(True):
            cfg = open_clip.get_model_config(model)
        return model, cfg, model
    if model.startswith("local-dir:"):
        return model, open_clip.get_model_config(model), model
    name = model.replace("/", "-")
    cfg = open_clip.get_model_config(name)
    if is_hf_text(cfg):      # e.g. roberta-ViT-B-32: its text tower comes from the hub
        resolve_names(cfg, None, f"--model {model}")
    return name, cfg, name


def load_model(spec: ModelSpec | None = None, *, model=None, pretrained=None, checkpoint=None, device=None,
               precision="fp32", seed=None, experts: ExpertConfig | None = None, loss: LossConfig | None = None,
               source: ModelSource | None = None):
    """Build an EntityCLIP from model options (see README, "Python API"). `source`: the options
    already resolved by eclip.model.source.resolve_source (which reports bad input)."""
    spec = spec or ModelSpec(model=model, pretrained=pretrained, checkpoint=checkpoint, device=device,
                             precision=precision, seed=seed)
    source = source or resolve_source(spec)      # input errors first, before torch is imported
    device = resolve_device(spec.device)
    if source.kind == "checkpoint":
        return _cast(load_checkpoint(source.weights, device=device), spec.precision)
    name, clip_cfg, tokenizer = resolve_architecture(source.arch)
    user_file = source.weights if source.kind == "file" else None   # checked by resolve_source
    seed = source.identity.get("seed")
    with seeded(seed if seed is not None else spec.seed):   # random weights: the same options, the same model
        m = build(name, clip_cfg, tokenizer, experts or ExpertConfig(), loss or LossConfig(),
                  pretrained=None if user_file else (source.weights or source.tag), tag_cfg=source.tag_cfg,
                  device=device)
    if user_file:
        from eclip.model.weights import load_weights_file
        load_weights_file(m.clip, user_file, source.arch)
    m.source = dict(source.identity)
    return _cast(m, spec.precision)


def load_inference_model(spec, source=None):
    """The torch model for inference: CLIP towers only, fp32 weights (precision is autocast).

    Experts and the matching head exist only for training; they are not built unless the
    weights come from an eclip checkpoint (whose header describes them).
    """
    model = load_model(replace(spec, precision="fp32"), experts=ExpertConfig(enabled=False), source=source)
    return model.eval()


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


def load_checkpoint(path, device: str = "cpu"):
    """Rebuild the model an eclip checkpoint describes from its header alone and load the weights (strict)."""
    from safetensors.torch import load_model as load_weights

    from eclip.checkpoint import read_config
    from eclip.model.hf_text import HEADER_KEY, rebuild_config
    meta, config = read_config(path)
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
        load_weights(model, str(path), strict=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise EclipError(f"{path}: weights do not fit the model its header describes ({first})")
    # the sha256 is computed by identity() when first asked: plain matching never needs it
    model.source = checkpoint_source(path, config.clip_name)
    return model.to(device)


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
