"""CLIP towers that return every token in the joint space (METHOD.md, "Backbone").

Built on open_clip's `forward_intermediates` so the towers are never re-implemented:
the last block's output, after the tower's final layer norm, is projected like
the pooled feature. Token 0 of the image and the EOT token of the text therefore
equal open_clip's `encode_image` / `encode_text`.

Towers without token outputs (ModifiedResNet, timm, Hugging Face text towers) fall
back to a single token: the pooled feature. The experts then see one token per
side; training still works, with less for attention to look at.
"""
from __future__ import annotations

import torch
from open_clip.transformer import TextTransformer, VisionTransformer


def _project(x: torch.Tensor, proj) -> torch.Tensor:
    if proj is None:
        return x
    return proj(x) if isinstance(proj, torch.nn.Module) else x @ proj


def _vit_has_token_outputs(visual) -> bool:
    return (isinstance(visual, VisionTransformer) and visual.attn_pool is None
            and not visual.final_ln_after_pool and visual.pool_type == "tok")


def image_tokens(clip, images: torch.Tensor):
    """images [B,3,H,W] -> (tokens [B, 1+P, D], pooled [B, D]); pooled == encode_image (unnormalised)."""
    visual = clip.visual
    if not _vit_has_token_outputs(visual):
        pooled = clip.encode_image(images)
        return pooled[:, None], pooled
    out = visual.forward_intermediates(images, indices=1, normalize_intermediates=True,
                                       output_fmt="NLC", output_extra_tokens=True)
    x = torch.cat([out["image_intermediates_prefix"][-1], out["image_intermediates"][-1]], dim=1)
    return _project(x, visual.proj), out["image_features"]


def _text_tower(clip):
    """(tower, token_embedding-owner) for CLIP (text tower inlined) or CustomTextCLIP (clip.text)."""
    text = getattr(clip, "text", None)
    if isinstance(text, TextTransformer) and text.cls_emb is None:
        return text
    if hasattr(clip, "transformer") and hasattr(clip, "token_embedding"):
        return clip
    return None


def eot_positions(tokens: torch.Tensor, pool_type: str = "argmax", eos_id=None) -> torch.Tensor:
    """Index of the pooled (end-of-text) token per row, as open_clip's text_global_pool picks it."""
    if pool_type == "argmax":      # CLIP BPE: EOT has the highest id in the vocabulary
        return tokens.argmax(dim=-1)
    if pool_type == "eos":
        return (tokens == eos_id).int().argmax(dim=-1)
    if pool_type == "last":
        return torch.full(tokens.shape[:1], tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)
    return torch.zeros(tokens.shape[:1], dtype=torch.long, device=tokens.device)


def text_tokens(clip, tokens: torch.Tensor):
    """tokens [B, L] -> (features [B, L, D], pooled [B, D], eot [B], padding [B, L] bool).

    `padding` is True after the EOT position: those keys are masked in expert attention.
    """
    tower = _text_tower(clip)
    if tower is None:
        pooled = clip.encode_text(tokens)
        zeros = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        return pooled[:, None], pooled, zeros, torch.zeros(tokens.shape[0], 1, dtype=torch.bool, device=tokens.device)
    if tower is clip:   # open_clip CLIP: text tower lives on the model itself
        pool_type, eos_id = clip.text_pool_type, getattr(clip, "text_eos_id", None)
        out = clip.forward_intermediates(text=tokens, text_indices=1, normalize=False, normalize_intermediates=True)
    else:
        pool_type, eos_id = tower.pool_type, getattr(tower, "eos_id", None)
        out = tower.forward_intermediates(tokens, indices=1, normalize_intermediates=True, output_fmt="NLC")
    feats = _project(out["text_intermediates"][-1], tower.text_projection)
    eot = eot_positions(tokens, pool_type, eos_id)
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    padding = positions[None, :] > eot[:, None]
    return feats, out["text_features"], eot, padding
