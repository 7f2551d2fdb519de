"""The hf format: a transformers CLIPModel + CLIPProcessor folder.

The tensors are renamed and split as transformers' own converter for OpenAI's CLIP does
(models/clip/convert_clip_original_pytorch_to_hf.py): in_proj -> q/k/v, c_fc/c_proj -> fc1/fc2,
ln_1/ln_2 -> layer_norm1/2, proj matrices transposed into Linear weights. open_clip's ViT and
CLIP text transformer map one to one; anything else (a timm or ConvNeXt image tower, a Hugging
Face text tower, attention pooling, layer scale, ...) has no CLIPModel equivalent and is refused.
quick_gelu -> hidden_act "quick_gelu", else "gelu" (exact, as nn.GELU); layer-norm eps 1e-5 as
open_clip's nn.LayerNorm; logit_scale copied as its logarithm, as both store it.
"""
from __future__ import annotations

from pathlib import Path

from eclip.errors import EclipError

REFUSAL = "--format hf: transformers' CLIPModel holds only a ViT image tower and CLIP's text transformer; "


def check(model) -> None:
    """EclipError naming what does not map onto CLIPModel."""
    import open_clip
    import torch
    from open_clip.transformer import VisionTransformer
    clip = model.clip
    if not isinstance(clip, open_clip.CLIP) or not isinstance(getattr(clip, "visual", None), VisionTransformer):
        image = type(getattr(clip, "visual", None)).__name__
        text = type(getattr(clip, "text", None)).__name__ if hasattr(clip, "text") else "TextTransformer"
        raise EclipError(REFUSAL + f"this model has a {image} image tower and a {text} text tower; "
                         f"use --format open-clip")
    v = clip.visual
    problems = []
    if getattr(v, "attn_pool", None) is not None or getattr(v, "pool_type", "tok") != "tok":
        problems.append("image pooling other than the class token")
    if getattr(v, "final_ln_after_pool", False) or not isinstance(v.proj, torch.nn.Parameter):
        problems.append("an unusual image head")
    if not isinstance(getattr(v, "ln_pre", None), torch.nn.LayerNorm):
        problems.append("no pre-layer-norm")
    blocks = list(v.transformer.resblocks) + list(clip.transformer.resblocks)
    if any(type(getattr(b, "ls_1", None)).__name__ != "Identity" for b in blocks):
        problems.append("layer scale")
    if any(not isinstance(b.attn, torch.nn.MultiheadAttention) or b.attn.in_proj_bias is None for b in blocks):
        problems.append("a custom attention block")
    if getattr(clip, "attn_mask", None) is None:
        problems.append("a text tower without the causal mask")
    if getattr(clip, "text_pool_type", "argmax") != "argmax" or getattr(clip, "text_projection", None) is None \
            or not isinstance(clip.text_projection, torch.nn.Parameter):
        problems.append("text pooling other than CLIP's end-of-text token")
    if problems:
        raise EclipError(REFUSAL + f"this model has {', '.join(problems)}; use --format open-clip")


def configs(model):
    """The CLIPConfig for this open_clip model."""
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
    clip, cfg = model.clip, model.config.clip_config
    act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"
    v, t = clip.visual, clip.transformer
    v_width, t_width = v.conv1.out_channels, clip.token_embedding.embedding_dim
    size = v.image_size if isinstance(v.image_size, int) else v.image_size[0]
    patch = v.patch_size if isinstance(v.patch_size, int) else v.patch_size[0]
    vision = CLIPVisionConfig(hidden_size=v_width, intermediate_size=v.transformer.resblocks[0].mlp.c_fc.out_features,
                              num_hidden_layers=len(v.transformer.resblocks),
                              num_attention_heads=v.transformer.resblocks[0].attn.num_heads, image_size=size,
                              patch_size=patch, hidden_act=act, layer_norm_eps=v.ln_pre.eps,
                              projection_dim=cfg["embed_dim"])
    text = CLIPTextConfig(vocab_size=clip.vocab_size, hidden_size=t_width,
                          intermediate_size=t.resblocks[0].mlp.c_fc.out_features, num_hidden_layers=len(t.resblocks),
                          num_attention_heads=t.resblocks[0].attn.num_heads,
                          max_position_embeddings=clip.positional_embedding.shape[0], hidden_act=act,
                          layer_norm_eps=clip.ln_final.eps, projection_dim=cfg["embed_dim"],
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=cfg["embed_dim"],
                      logit_scale_init_value=float(clip.logit_scale.detach()))


def _blocks(out: dict, prefix: str, resblocks) -> None:
    for i, b in enumerate(resblocks):
        p = f"{prefix}.encoder.layers.{i}"
        q, k, v = b.attn.in_proj_weight.detach().chunk(3)
        qb, kb, vb = b.attn.in_proj_bias.detach().chunk(3)
        out.update({f"{p}.self_attn.q_proj.weight": q, f"{p}.self_attn.k_proj.weight": k,
                    f"{p}.self_attn.v_proj.weight": v, f"{p}.self_attn.q_proj.bias": qb,
                    f"{p}.self_attn.k_proj.bias": kb, f"{p}.self_attn.v_proj.bias": vb,
                    f"{p}.self_attn.out_proj.weight": b.attn.out_proj.weight, f"{p}.self_attn.out_proj.bias": b.attn.out_proj.bias,
                    f"{p}.layer_norm1.weight": b.ln_1.weight, f"{p}.layer_norm1.bias": b.ln_1.bias,
                    f"{p}.layer_norm2.weight": b.ln_2.weight, f"{p}.layer_norm2.bias": b.ln_2.bias,
                    f"{p}.mlp.fc1.weight": b.mlp.c_fc.weight, f"{p}.mlp.fc1.bias": b.mlp.c_fc.bias,
                    f"{p}.mlp.fc2.weight": b.mlp.c_proj.weight, f"{p}.mlp.fc2.bias": b.mlp.c_proj.bias})


def state_dict(model) -> dict:
    """open_clip tensor -> CLIPModel tensor."""
    clip = model.clip
    v = clip.visual
    out = {"logit_scale": clip.logit_scale,
           "text_model.embeddings.token_embedding.weight": clip.token_embedding.weight,
           "text_model.embeddings.position_embedding.weight": clip.positional_embedding,
           "text_model.final_layer_norm.weight": clip.ln_final.weight,
           "text_model.final_layer_norm.bias": clip.ln_final.bias,
           "text_projection.weight": clip.text_projection.T,
           "vision_model.embeddings.class_embedding": v.class_embedding,
           "vision_model.embeddings.patch_embedding.weight": v.conv1.weight,
           "vision_model.embeddings.position_embedding.weight": v.positional_embedding,
           "vision_model.pre_layrnorm.weight": v.ln_pre.weight, "vision_model.pre_layrnorm.bias": v.ln_pre.bias,
           "vision_model.post_layernorm.weight": v.ln_post.weight, "vision_model.post_layernorm.bias": v.ln_post.bias,
           "visual_projection.weight": v.proj.T}
    _blocks(out, "text_model", clip.transformer.resblocks)
    _blocks(out, "vision_model", v.transformer.resblocks)
    return {k: t.detach().float().contiguous().clone() for k, t in out.items()}


def processor(model, folder: Path):
    """CLIPProcessor: CLIP's tokenizer (as in the onnx format) and the eval transform's numbers.

    One difference remains, transformers' own: its centre crop starts at floor((W - size) / 2),
    torchvision's (open_clip's) at round((W - size) / 2); where the resized image's margin is odd
    the crops are one pixel apart (as with every CLIP on the Hub)."""
    from transformers import CLIPProcessor, PreTrainedTokenizerFast
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    except ImportError:      # transformers 4: CLIPImageProcessor is the PIL one
        from transformers import CLIPImageProcessor as CLIPImageProcessorPil

    from eclip.exporters.onnx import clip_tokenizer
    from eclip.runtime.tokenizer import SPECIALS
    pre = model.config.preprocess
    size = pre.get("size", 224)
    size = size if isinstance(size, int) else size[0]
    resample = 2 if pre.get("interpolation") == "bilinear" else 3        # PIL.Image.BILINEAR / BICUBIC
    # the PIL backend: PIL's resize, as open_clip's transform (the torchvision backend resizes otherwise)
    images = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                image_mean=list(pre["mean"]), image_std=list(pre["std"]), resample=resample,
                                do_center_crop=True, do_convert_rgb=True)
    context = model.config.context_length
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=clip_tokenizer(context), bos_token=SPECIALS[0],
                                        eos_token=SPECIALS[1], pad_token="!", unk_token=SPECIALS[1],
                                        model_max_length=context)
    return CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def write(model, work: Path, final: Path) -> dict:
    from transformers import CLIPModel
    hf = CLIPModel(configs(model)).eval()
    weights = state_dict(model)
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:      # a transformers version that names CLIP's tensors otherwise
        raise EclipError(f"--format hf: the installed transformers' CLIPModel does not take these tensors "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    from eclip.model.factory import quiet_transformers
    with quiet_transformers():
        hf.save_pretrained(str(work), safe_serialization=True)
        processor(model, work).save_pretrained(str(work))
    return {"usage": ["from transformers import CLIPModel, CLIPProcessor",
                      'model = CLIPModel.from_pretrained("THIS_FOLDER")',
                      '# backend="pil": open_clip\'s pixels (the torchvision backend resizes a little differently)',
                      'processor = CLIPProcessor.from_pretrained("THIS_FOLDER", backend="pil")']}
