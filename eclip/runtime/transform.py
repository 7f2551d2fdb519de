"""open_clip's evaluation transform in PIL and numpy: the same pixels, without torch.

open_clip's eval transform (image_transform_v2, is_train=False) on a PIL image is a PIL resize,
a centre crop (zero padding when the image is smaller), RGB, /255 and (x - mean) / std in
float32. Those are PIL calls and float32 arithmetic in the same order, so the arrays here are
bit-for-bit the tensors torchvision makes (tests/test_onnx_engine.py compares them).
Supported: resize_mode "shortest" with a square size, and "squash"; `supports` says which
configs, and others use the torch engine.
"""
from __future__ import annotations

import numpy as np
from PIL import Image


def _size(cfg: dict) -> tuple[int, int]:
    size = cfg.get("size", 224)
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def supports(cfg: dict) -> bool:
    h, w = _size(cfg)
    mode = cfg.get("resize_mode") or "shortest"
    return cfg.get("mode", "RGB") == "RGB" and (mode == "squash" or (mode == "shortest" and h == w))


class EvalTransform:
    """PIL image -> float32 array [3, H, W]; `resize_crop` (PIL work) and `to_array` (numpy)
    are its two halves."""

    def __init__(self, cfg: dict):
        if not supports(cfg):
            raise ValueError(f"preprocessing not supported without torch: {cfg}")
        self.height, self.width = _size(cfg)
        self.squash = (cfg.get("resize_mode") or "shortest") == "squash"
        self.resample = Image.BILINEAR if cfg.get("interpolation") == "bilinear" else Image.BICUBIC
        self.mean = np.asarray(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)), np.float32).reshape(3, 1, 1)
        self.std = np.asarray(cfg.get("std", (0.26862954, 0.26130258, 0.27577711)), np.float32).reshape(3, 1, 1)

    def resize_crop(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if self.squash:
            size = (self.width, self.height)
        else:   # shorter side to the target, as torchvision's Resize(int) computes it
            short, long = min(w, h), max(w, h)
            new_short, new_long = self.height, int(self.height * long / short)
            size = (new_short, new_long) if w <= h else (new_long, new_short)
        if size != (w, h):
            image = image.resize(size, self.resample)
        return image if self.squash else self._center_crop(image)

    def _center_crop(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        ch, cw = self.height, self.width
        if cw > w or ch > h:   # torchvision pads with zeros first
            padded = Image.new(image.mode, (max(w, cw), max(h, ch)), 0)
            padded.paste(image, ((cw - w) // 2 if cw > w else 0, (ch - h) // 2 if ch > h else 0))
            image, (w, h) = padded, padded.size
            if (w, h) == (cw, ch):
                return image
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
        return image.crop((left, top, left + cw, top + ch))

    def to_array(self, image: Image.Image) -> np.ndarray:
        pixels = np.asarray(image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1).astype(np.float32)
        return (pixels / np.float32(255) - self.mean) / self.std

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self.to_array(self.resize_crop(image))
