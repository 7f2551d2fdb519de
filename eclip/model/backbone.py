"""CLIP towers that return every token in the joint space (METHOD.md, "Backbone").

Built on open_clip's `forward_intermediates` so the towers are never re-implemented:
the last block's output, after the tower's final layer norm, is projected like
the pooled feature. Token 0 of the image and the EOT token of the text therefore
equal open_clip's `encode_image` / `encode_text`.

Hugging Face text towers give every token's last hidden state through the tower's own
projection, with the padding mask from the attention mask; see `hf_text_tokens` for the
pooled position.

Towers without token outputs (ModifiedResNet, timm) fall back to a single token: the
pooled feature. The experts then see one token on that side; training still works,
with less for attention to look at (`single_token_towers` names them, and training
says so at start).
"""
from __future__ import annotations

import torch
from open_clip.hf_model import HFTextEncoder
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
    """The text tower with token outputs: clip itself (CLIP inlines it), clip.text, or None."""
    text = getattr(clip, "text", None)
    if isinstance(text, HFTextEncoder) or isinstance(text, TextTransformer) and text.cls_emb is None:
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
    """tokens [B, L] -> (features [B, L', D], pooled [B, D], position [B], padding [B, L'] bool).

    `features[i, position[i]]` is the pooled feature (encode_text); the experts read there.
    `padding` is True for padded keys (after EOT; for HF towers where the attention mask is 0):
    those keys are masked in expert attention. L' = L, or L + 1 for a mean-pooled HF tower.
    """
    tower = _text_tower(clip)
    if isinstance(tower, HFTextEncoder):
        return hf_text_tokens(tower, tokens)
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


def hf_text_tokens(tower: HFTextEncoder, tokens: torch.Tensor):
    """A Hugging Face text tower's tokens, as `text_tokens` returns them.

    Every token's last hidden state goes through the tower's projection (linear or mlp: both act
    on each token alone, so projecting all tokens and picking one equals picking then projecting).
    The pooled position, where `features` holds the pooled feature:
      - CLS pooling: token 0 (equal up to float rounding of the batched matmul). With BERT's
        pooler head (`cls_pooler` on a model that has one) the pooled feature is
        proj(tanh(W h_0 + b)), not proj(h_0): token 0 holds the pooled feature itself.
      - mean (or any pooling over tokens): no token is the pooled feature, so it is put in front of
        the tokens as a summary token at position 0, never padded (docs/METHOD.md, "Hugging Face
        text towers: where the experts read").
    """
    return hf_text_head(tower, *hf_text_trunk(tower, tokens))


def hf_text_trunk(tower: HFTextEncoder, tokens: torch.Tensor):
    """The transformer part of a Hugging Face text tower (what --lock-text freezes; its projection stays
    trainable): tokens [B, L] -> (last hidden states [B, L, H], pooled before projection [B, H], padding [B, L])."""
    mask = (tokens != tower.config.pad_token_id).long()          # exactly as HFTextEncoder.forward
    out = tower.transformer(input_ids=tokens, attention_mask=mask)
    return out.last_hidden_state, tower.pooler(out, mask), mask == 0


def hf_text_head(tower: HFTextEncoder, hidden: torch.Tensor, pooled: torch.Tensor, padding: torch.Tensor):
    """`hf_text_trunk`'s outputs through the tower's projection, laid out as `text_tokens` returns them."""
    pooled = tower.proj(pooled)                                    # == clip.encode_text(tokens)
    feats = tower.proj(hidden)                                     # [B, L, D]
    position = getattr(tower.pooler, "cls_token_position", None)
    b = hidden.shape[0]
    if position is None:
        feats = torch.cat([pooled[:, None], feats], dim=1)
        padding = torch.cat([padding.new_zeros(b, 1), padding], dim=1)
        position = 0
    elif getattr(tower.pooler, "use_pooler_output", False):     # BERT's pooler head (when the model has one)
        feats = torch.cat([feats[:, :position], pooled[:, None], feats[:, position + 1:]], dim=1)
    return feats, pooled, torch.full((b,), position, dtype=torch.long, device=hidden.device), padding


def single_token_towers(clip) -> list[str]:
    """Names of the towers that give the experts one token (the pooled feature) instead of all."""
    out = []
    if not _vit_has_token_outputs(clip.visual):
        out.append(f"image tower ({type(clip.visual).__name__})")
    if _text_tower(clip) is None:
        out.append(f"text tower ({type(getattr(clip, 'text', clip)).__name__})")
    return out
