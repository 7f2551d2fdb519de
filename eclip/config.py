"""Configuration as data. These dataclasses serialise into checkpoint headers,
so a checkpoint alone rebuilds its model. No torch import here."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "openai"
# `eclip train --augment`: open_clip's training transform with these AugmentationCfg fields. Random
# crops of 50-100% of the image and mild brightness/contrast/saturation jitter; no hue change and no
# flip (open_clip's transform never flips), so a flag's colours and orientation, its identity, survive.
AUGMENT = {"scale": [0.5, 1.0], "color_jitter": [0.3, 0.3, 0.3, 0.0], "color_jitter_prob": 0.8}


def eclip_cache_dir() -> Path:
    """$ECLIP_CACHE, else ~/.cache/eclip (or $XDG_CACHE_HOME/eclip): the LLM copy, ONNX exports."""
    if os.environ.get("ECLIP_CACHE"):
        return Path(os.environ["ECLIP_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "eclip"


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


# how GI-ITM draws its hard negatives: softmax over the non-positives (eclip), or the reference's
# softmax with the positive zeroed and 1e-5 added to every weight (METHOD.md, "Where eclip differs")
NEGATIVES = ("softmax", "reference")


@dataclass
class LossConfig:
    """L = VTC(V_cls, T_cls) + eta * L_GFM + lambda * VTC(V*, T*)."""
    eta: float = 0.1
    lam: float = 0.1
    negatives: str = "softmax"          # GI-ITM's draw, one of NEGATIVES


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


def config_problem(d) -> Optional[str]:
    """The first field of an EntityCLIPConfig dict (a checkpoint header's `config`) whose type or
    value cannot be right, as "config.FIELD: what is wrong"; None when every field is plausible."""
    def is_int(v, low=0):
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    def is_number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def numbers(v, lengths):
        return isinstance(v, list) and len(v) in lengths and all(is_number(x) for x in v)

    if not isinstance(d, dict):
        return f"config: expected a JSON object, got {type(d).__name__}"
    known = EntityCLIPConfig.__dataclass_fields__
    for key in d:
        if key not in known:
            return f"config.{key}: unknown field"
    for key in ("clip_name", "clip_config", "preprocess", "tokenizer"):
        if key not in d:
            return f"config.{key}: missing"
    checks = [
        ("clip_name", isinstance(d["clip_name"], str), "a string"),
        ("tokenizer", isinstance(d["tokenizer"], str) and bool(d["tokenizer"]), "a tokenizer name (a string)"),
        ("context_length", is_int(d.get("context_length", 77), 1), "a positive integer"),
        ("clip_config", isinstance(d["clip_config"], dict), "an open_clip model config (a JSON object)"),
        ("preprocess", isinstance(d["preprocess"], dict), "an object (size, mean, std, ...)"),
        ("experts", isinstance(d.get("experts", {}), dict), "an object (n_vision, n_text, ...)"),
        ("loss", isinstance(d.get("loss", {}), dict), "an object (eta, lam)"),
    ]
    clip, pre = d["clip_config"], d["preprocess"]
    if isinstance(clip, dict):
        checks += [("clip_config.embed_dim", is_int(clip.get("embed_dim"), 1), "a positive integer"),
                   ("clip_config.vision_cfg", isinstance(clip.get("vision_cfg"), dict), "a JSON object"),
                   ("clip_config.text_cfg", isinstance(clip.get("text_cfg"), dict), "a JSON object")]
    if isinstance(pre, dict):
        size = pre.get("size", 224)
        checks += [("preprocess.size", is_int(size, 1) or isinstance(size, list) and len(size) == 2
                    and all(is_int(x, 1) for x in size), "a positive integer or [height, width]"),
                   ("preprocess.mean", numbers(pre.get("mean", [0, 0, 0]), (1, 3)), "a list of 3 numbers"),
                   ("preprocess.std", numbers(pre.get("std", [1, 1, 1]), (1, 3)), "a list of 3 numbers"),
                   ("preprocess.interpolation", isinstance(pre.get("interpolation", ""), str), "a string"),
                   ("preprocess.resize_mode", isinstance(pre.get("resize_mode", ""), str), "a string")]
    for group, cls, fields in (("experts", ExpertConfig, {"n_vision": 0, "n_text": 0, "n_shared": 0, "heads": 1}),
                               ("loss", LossConfig, {})):
        values = d.get(group, {})
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            if key not in cls.__dataclass_fields__:
                checks.append((f"{group}.{key}", False, "a known field"))
            elif key in fields:
                checks.append((f"{group}.{key}", is_int(value, fields[key]), f"an integer of at least {fields[key]}"))
            elif key == "enabled":
                checks.append((f"{group}.{key}", isinstance(value, bool), "true or false"))
            elif key == "negatives":
                checks.append((f"{group}.{key}", value in NEGATIVES, f"one of {', '.join(NEGATIVES)}"))
            else:
                checks.append((f"{group}.{key}", is_number(value) and value >= 0, "a number of at least 0"))
    for field_name, ok, expected in checks:
        if not ok:
            value = _field(d, field_name)
            shown = json.dumps(value)[:40] if value is not _MISSING else "missing"
            return f"config.{field_name}: expected {expected}, got {shown}"
    return None


_MISSING = object()


def _field(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return _MISSING
        d = d[part]
    return d


# which validation makes best.safetensors: the highest val rsum, or the lowest val loss (the reference's rule)
SELECT_BY = ("rsum", "val-loss")


@dataclass
class TrainConfig:
    """One training run (`eclip train`); saved as RUN_DIR/config.json so `--resume RUN_DIR` alone
    continues it. Defaults follow the reference setup in METHOD.md.

    `batch_size` is the global batch: the pairs whose contrastive negatives are shared in one
    forward pass, split evenly over the processes (N processes with batch_size B train like
    one process with B). `grad_accum` sums gradients of several such batches per optimizer
    step; it saves memory but does not add negatives. Steps (`eval_every`, `save_every`,
    `log_every`, `warmup_steps`) count optimizer steps. `accum_freq` computes each batch in that
    many micro-batches with the same loss and gradient (and all its negatives): it saves memory only.
    """
    output: str                           # RUN_DIR
    dataset: Optional[str] = None         # n24news | visualnews | goodnews | FILE.jsonl / FILE.csv
    data_root: Optional[str] = None       # None: $ECLIP_DATA/<dataset> or ~/.cache/eclip/data/<dataset>
    val_dataset: Optional[str] = None     # None: the benchmark's val split, FILE with train -> val, or a share
    val_fraction: Optional[float] = None  # share of --dataset's images held out for validation (the default,
                                          # 0.05, when a file has no val file beside it)
    no_val: bool = False                  # no validation: best.safetensors is the last model
    explanations: Optional[str] = None    # `eclip explain` cache, or the authors' CapDsc_mistral file
    image_folder: Optional[str] = None    # a benchmark's image folder where it offers a choice (GoodNews: resized)
    image_key: Optional[str] = None       # --image-key / --text-key / --id-key: fields of shards and tables
    text_key: Optional[str] = None        # (eclip.data.shards.Columns)
    id_key: Optional[str] = None
    shuffle_buffer: Optional[int] = None  # read shards in a shuffled order through a buffer of N (eclip.data.stream)
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
    lock_image_unlocked_groups: int = 0   # freeze the image tower but its last N layer groups (open_clip's)
    lock_text_unlocked_layers: int = 0    # freeze the text tower but its last N layers (open_clip's)
    lock_image_freeze_bn_stats: bool = False   # frozen batch-norm layers keep their running statistics
    grad_checkpointing: bool = False      # recompute tower blocks and experts in backward: less memory
    accum_freq: int = 1                   # compute each batch in this many micro-batches, same loss and gradient
    tower_cache_mb: float = 1024          # a fully locked tower's outputs, kept per distinct input (0: off)
    tower_cache_disk: bool = False        # also keep them in RUN_DIR/tower-cache/ (survives a resume)
    data_cache_mb: float = 0              # decoded training images and tokens kept, per loading process (0: off)
    eta: Optional[float] = None           # None: LossConfig's default (or the checkpoint's)
    lam: Optional[float] = None
    negatives: Optional[str] = None       # None: LossConfig's default (or the checkpoint's)
    vision_experts: Optional[int] = None  # None: ExpertConfig's default (or the checkpoint's)
    text_experts: Optional[int] = None
    shared_experts: Optional[int] = None
    no_experts: bool = False              # plain CLIP fine-tuning: the baseline
    augment: Optional[dict] = None        # open_clip AugmentationCfg fields for training images (--augment:
                                          # AUGMENT); None: the eval transform, as in the reference
    workers: int = 4
    select_by: str = "rsum"               # one of SELECT_BY
    protocol: Optional[str] = None        # "paper": the reference's readers (eclip.protocol); None: eclip's
    val_frequency: int = 1                # validate at the end of every K-th epoch and of the last
    eval_every: int = 0                   # 0: validate at the end of epochs only (val_frequency)
    save_frequency: int = 1               # save the state and last.safetensors every K-th epoch and the last
    save_every: int = 0                   # 0: save the resumable state at the ends of epochs only (save_frequency)
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
