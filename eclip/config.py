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
    seed: Optional[int] = None         # random weights (no pretrained weights): the seed drawing them (None: 0)


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


@dataclass
class TrainConfig:
    """One training run (`eclip train`); saved as RUN_DIR/config.json so `--resume RUN_DIR` alone
    continues it. Defaults follow the reference setup in METHOD.md.

    `batch_size` is the global batch: the pairs whose contrastive negatives are shared in one
    forward pass, split evenly over the processes (N processes with batch_size B train like
    one process with B). `grad_accum` sums gradients of several such batches per optimizer
    step; it saves memory but does not add negatives. Steps (`eval_every`, `save_every`,
    `log_every`, `warmup_steps`) count optimizer steps.
    """
    output: str                           # RUN_DIR
    dataset: Optional[str] = None         # n24news | visualnews | goodnews | FILE.jsonl / FILE.csv
    data_root: Optional[str] = None       # None: $ECLIP_DATA/<dataset> or ~/.cache/eclip/data/<dataset>
    val_dataset: Optional[str] = None     # None: the benchmark's val split, or FILE with train -> val
    explanations: Optional[str] = None    # explanation cache from `eclip explain`
    train_split: str = "train"
    val_split: str = "val"
    model: Optional[str] = None
    pretrained: Optional[str] = None
    checkpoint: Optional[str] = None
    device: Optional[str] = None
    precision: str = "fp32"               # mixed precision through Accelerate; weights stay fp32
    epochs: int = 20
    batch_size: int = 192
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_accum: int = 1
    seed: int = 42
    lock_image: bool = False
    lock_text: bool = False
    eta: Optional[float] = None           # None: LossConfig's default (or the checkpoint's)
    lam: Optional[float] = None
    vision_experts: Optional[int] = None  # None: ExpertConfig's default (or the checkpoint's)
    text_experts: Optional[int] = None
    shared_experts: Optional[int] = None
    no_experts: bool = False              # plain CLIP fine-tuning: the baseline
    workers: int = 4
    eval_every: int = 0                   # 0: validate at the end of each epoch only
    save_every: int = 0                   # 0: save the resumable state at the end of each epoch only
    log_every: int = 10
    tensorboard: bool = True              # when the tensorboard package is installed

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def model_spec(self) -> ModelSpec:
        return ModelSpec(model=self.model, pretrained=self.pretrained, checkpoint=self.checkpoint,
                         device=self.device, precision=self.precision, seed=self.seed)
