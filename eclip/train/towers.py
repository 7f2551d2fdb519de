"""Which parts of the CLIP towers train, and how they save memory.

--lock-image / --lock-image-unlocked-groups N / --lock-image-freeze-bn-stats and --lock-text /
--lock-text-unlocked-layers N are open_clip's `lock_image_tower` / `lock_text_tower` (its groups:
for a ViT the patch embedding, each block, the last block with the final norm, the projection;
for the CLIP text tower the embeddings, each block, the last block with the final norm, the
projection; for a Hugging Face tower the embeddings and each layer). --grad-checkpointing is
open_clip's `set_grad_checkpointing` in both towers plus checkpointing of every expert group.
The experts and the matching head always train.

`check_tower_options` needs only the model's open_clip config, so the command line runs it
before torch loads; `apply_tower_options` runs it again on the built model (a checkpoint's or a
timm tower's groups are known only then) and applies the options.
"""
from __future__ import annotations

import contextlib
import io

from eclip.config import TrainConfig
from eclip.errors import EclipError


def image_tower_kind(clip_config: dict) -> str:
    """vit | resnet | timm, from an open_clip model config."""
    vision = clip_config.get("vision_cfg", {})
    if vision.get("timm_model_name"):
        return "timm"
    return "resnet" if isinstance(vision.get("layers"), (list, tuple)) else "vit"


def image_groups(clip_config: dict) -> int | None:
    """How many groups open_clip's lock_image_tower counts in a ViT (None: known once built)."""
    if image_tower_kind(clip_config) != "vit":
        return None
    return clip_config["vision_cfg"].get("layers", 12) + 2   # embedding, blocks but the last, last + ln_post, proj


def text_groups(clip_config: dict) -> int | None:
    """How many groups open_clip's lock_text_tower counts in a CLIP text tower (None: a Hugging Face tower)."""
    text = clip_config.get("text_cfg", {})
    if text.get("hf_model_name"):
        return None
    return text.get("layers", 12) + 2                        # embeddings, blocks but the last, last + ln_final, proj


def check_tower_options(cfg: TrainConfig, clip_config: dict | None) -> None:
    """EclipError, naming the option, when the towers cannot do what `cfg` asks; `clip_config`
    None (a hub model not yet read) checks only what needs no model."""
    if cfg.lock_image_unlocked_groups < 0 or cfg.lock_text_unlocked_layers < 0:
        raise EclipError("--lock-image-unlocked-groups / --lock-text-unlocked-layers: at least 0")
    if cfg.lock_image_freeze_bn_stats and not (cfg.lock_image or cfg.lock_image_unlocked_groups):
        raise EclipError("--lock-image-freeze-bn-stats freezes the batch-norm statistics of a locked image tower: "
                         "add --lock-image or --lock-image-unlocked-groups N")
    if clip_config is None:
        return
    kind = image_tower_kind(clip_config)
    n = cfg.lock_image_unlocked_groups
    if n and kind == "resnet":
        raise EclipError(f"--lock-image-unlocked-groups {n}: the image tower (ModifiedResNet) can only be locked "
                         f"whole in open_clip; use --lock-image")
    groups = image_groups(clip_config)
    if groups is not None and n > groups:
        raise EclipError(f"--lock-image-unlocked-groups {n}: the image tower has {groups} layer groups (patch "
                         f"embedding, {groups - 2} blocks, projection)")
    if cfg.lock_image_freeze_bn_stats and kind == "vit":
        raise EclipError("--lock-image-freeze-bn-stats: the image tower (VisionTransformer) has no batch norm")
    layers = text_groups(clip_config)
    if layers is not None and cfg.lock_text_unlocked_layers > layers:
        raise EclipError(f"--lock-text-unlocked-layers {cfg.lock_text_unlocked_layers}: the text tower has "
                         f"{layers} layer groups (embeddings, {layers - 2} blocks, projection)")
    image_trains = not (cfg.lock_image and not n)
    if cfg.grad_checkpointing and kind == "resnet" and image_trains:
        raise EclipError("--grad-checkpointing: the image tower (ModifiedResNet) cannot checkpoint its activations "
                         "in open_clip; lock it (--lock-image) or leave the option out")


def apply_tower_options(model, cfg: TrainConfig) -> None:
    """Lock tower parts and turn on checkpointing on a built EntityCLIP, as `cfg` says."""
    from open_clip.hf_model import HFTextEncoder
    clip = model.clip
    check_tower_options(cfg, model.config.clip_config)
    text = getattr(clip, "text", None)
    if isinstance(text, HFTextEncoder) and cfg.lock_text_unlocked_layers:
        layers = text.transformer.config.num_hidden_layers + 1           # embeddings and each layer
        if cfg.lock_text_unlocked_layers > layers:
            raise EclipError(f"--lock-text-unlocked-layers {cfg.lock_text_unlocked_layers}: the text tower has "
                             f"{layers} layer groups (embeddings, {layers - 1} layers)")
    if cfg.lock_image or cfg.lock_image_unlocked_groups:
        _check_timm_groups(clip.visual, cfg)
        clip.lock_image_tower(unlocked_groups=cfg.lock_image_unlocked_groups,
                              freeze_bn_stats=cfg.lock_image_freeze_bn_stats)
    if cfg.lock_text or cfg.lock_text_unlocked_layers:
        with contextlib.redirect_stdout(io.StringIO()):                  # open_clip's HF lock prints a line
            clip.lock_text_tower(unlocked_layers=cfg.lock_text_unlocked_layers)
    if cfg.grad_checkpointing:
        _checkpoint_towers(clip, text)
        if model.experts is not None:
            model.experts.checkpointing = True


def _check_timm_groups(visual, cfg: TrainConfig) -> None:
    trunk = getattr(visual, "trunk", None)
    if trunk is None:
        return
    if cfg.lock_image_unlocked_groups:
        from timm.models import group_parameters
        groups = len(group_parameters(trunk, trunk.group_matcher()))
        if cfg.lock_image_unlocked_groups > groups:
            raise EclipError(f"--lock-image-unlocked-groups {cfg.lock_image_unlocked_groups}: the image tower "
                             f"(timm {type(trunk).__name__}) has {groups} layer groups")
    if cfg.lock_image_freeze_bn_stats:
        import torch
        if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in trunk.modules()):
            raise EclipError(f"--lock-image-freeze-bn-stats: the image tower (timm {type(trunk).__name__}) "
                             f"has no batch norm")


def _checkpoint_towers(clip, text) -> None:
    """open_clip's set_grad_checkpointing, with the failures it only logs made errors, and
    Hugging Face towers checkpointed without re-entry (as open_clip's own towers are)."""
    from open_clip.hf_model import HFTextEncoder
    trunk = getattr(clip.visual, "trunk", None)
    if trunk is not None:              # timm: open_clip logs a warning and carries on without
        try:
            trunk.set_grad_checkpointing(True)
        except Exception:  # noqa: BLE001 - timm raises assorted errors for models without it
            raise EclipError(f"--grad-checkpointing: the image tower (timm {type(trunk).__name__}) cannot "
                             f"checkpoint its activations") from None
    else:
        clip.visual.set_grad_checkpointing(True)
    if isinstance(text, HFTextEncoder):
        try:
            text.transformer.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        except ValueError as e:
            raise EclipError(f"--grad-checkpointing: the text tower ({type(text.transformer).__name__}) cannot "
                             f"checkpoint its activations ({str(e).splitlines()[0]})") from None
    elif text is not None:
        text.set_grad_checkpointing(True)
    else:
        clip.transformer.grad_checkpointing = True

