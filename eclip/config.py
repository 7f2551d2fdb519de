"""Configuration as data. These dataclasses serialise into checkpoint headers,
so a checkpoint alone rebuilds its model. No torch import here."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "openai"


@dataclass
class ModelSpec:
    """What the user asked for on the command line (or in Python)."""
    model: Optional[str] = None        # architecture name, hf-hub:/local-dir: schema, or config JSON path
    pretrained: Optional[str] = None   # tag, weights file, or "none"
    checkpoint: Optional[str] = None   # eclip .safetensors checkpoint (overrides the two above)
    device: Optional[str] = None
    precision: str = "fp32"


@dataclass
class ExpertConfig:
    """Multimodal Attentive Experts (METHOD.md): counts per group and block shape."""
    n_vision: int = 4
    n_text: int = 4
    n_shared: int = 4
    heads: int = 1
    mlp_ratio: float = 4.0
    enabled: bool = True   # False: plain CLIP fine-tuning (the --no-experts baseline)


@dataclass
class LossConfig:
    """L = VTC(V_cls, T_cls) + eta * L_GFM + lambda * VTC(V*, T*)."""
    eta: float = 0.1
    lam: float = 0.1


@dataclass
class EntityCLIPConfig:
    """Everything a checkpoint needs to rebuild its model without any other input."""
    clip_name: str                      # name the architecture was known by (for display)
    clip_config: dict                   # the full open_clip model config (embed_dim, vision_cfg, text_cfg, ...)
    preprocess: dict                    # open_clip preprocess cfg: size, mean, std, interpolation, resize_mode
    tokenizer: str                      # open_clip tokenizer name (model name or hf-tokenizer name)
    context_length: int = 77
    experts: ExpertConfig = field(default_factory=ExpertConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EntityCLIPConfig":
        d = dict(d)
        d["experts"] = ExpertConfig(**d.get("experts", {}))
        d["loss"] = LossConfig(**d.get("loss", {}))
        return cls(**d)
