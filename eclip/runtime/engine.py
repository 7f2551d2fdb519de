"""The one loader for inference (embed, match, serve): model options -> an encoder, whatever runs it.

Inference is plain CLIP (METHOD.md, "Inference"). Two engines run it, behind one interface
(`encode_images`, `encode_texts`, `preprocess`, `image_stages`, `identity`, `logit_scale`, `dim`),
both returning float32 numpy features, L2-normalised:

- "onnx": the CLIP towers exported once to ONNX (eclip.runtime.onnx_cache) and run by ONNX Runtime,
  with a torch-free tokenizer and preprocessing. No torch, no open_clip: a cold `eclip match`
  answers in about a second or two instead of spending most of ten importing them.
- "torch": the EntityCLIP model from eclip.model.factory (GPU, fp16/bf16, models whose parts the
  ONNX path does not cover: Hugging Face text towers, random weights, unusual preprocessing).

engine="auto" (or $ECLIP_ENGINE) takes ONNX for fp32 on the CPU when the weights are a file
(checkpoint, weights file, cached tag) and torch otherwise.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import replace
from pathlib import Path

from eclip.errors import EclipError

ENGINES = ("auto", "onnx", "torch")


def load_encoder(spec, engine: str | None = None, *, throughput: bool = False):
    """Model options (eclip.config.ModelSpec) -> OnnxCLIP or TorchEncoder. Bad options fail here,
    before either engine is imported. `throughput`: tune ONNX Runtime for large batches
    (eclip embed) rather than for the first answer (eclip match)."""
    from eclip.model.source import resolve_source
    source = resolve_source(spec)
    if choose_engine(spec, source, engine) == "onnx":
        from eclip.runtime.onnx_cache import CacheNotWritable, load_or_export
        forced = (engine or os.environ.get("ECLIP_ENGINE")) == "onnx"
        try:
            encoder = load_or_export(spec, source, throughput=throughput)
        except CacheNotWritable as e:
            if forced:
                raise
            from eclip.console import note
            note(f"eclip: {e.where}: cannot write the ONNX copy of this model here ({e.reason}); running on the "
                 f"torch engine instead (slower to start; set ECLIP_CACHE to a writable folder)")
            encoder = None
        if encoder is not None and not isinstance(encoder, str):
            return encoder
        if forced and encoder is not None:
            raise EclipError(f"--engine onnx: this model does not run on ONNX Runtime ({encoder}); use --engine torch")
    from eclip.model.factory import load_inference_model
    return TorchEncoder(load_inference_model(spec, source=source), spec.precision)


def choose_engine(spec, source, engine: str | None = None) -> str:
    engine = engine or os.environ.get("ECLIP_ENGINE") or "auto"
    if engine not in ENGINES:
        raise EclipError(f"--engine {engine}: one of {', '.join(ENGINES)}")
    if engine == "torch":
        return "torch"
    reason = onnx_unsuitable(spec, source)
    if reason and engine == "onnx":
        raise EclipError(f"--engine onnx: {reason}")
    return "torch" if reason else "onnx"


def onnx_unsuitable(spec, source) -> str | None:
    """Why these options need the torch engine, or None."""
    if (spec.precision or "fp32") != "fp32":
        return f"--precision {spec.precision} runs on the torch engine"
    device = spec.device or ("" if gpu_present() else "cpu")
    if not device.startswith("cpu"):
        return f"--device {spec.device or 'auto (a GPU is present)'} runs on the torch engine"
    from eclip.model.hf_text import is_hf_text
    if source.clip_config and is_hf_text(source.clip_config):
        return "a Hugging Face text tower (its tokenizer) runs on the torch engine"
    if source.kind == "random":
        return "random weights (--pretrained none) are not exported"
    if source.kind == "repo":
        return f"{source.arch}: models from hf-hub:/local-dir: run on the torch engine"
    if source.weights is None:
        return f"--pretrained {source.tag}: the weights are not downloaded yet"
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed"
    return None


def gpu_present() -> bool:
    """Could torch see a GPU? Asked without importing torch: a visible NVIDIA or AMD device node."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return any(Path(p).exists() for p in ("/dev/nvidiactl", "/proc/driver/nvidia/version", "/dev/kfd"))


def autocast(device, precision: str):
    import torch
    if precision in (None, "fp32"):
        return contextlib.nullcontext()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


class TorchEncoder:
    """EntityCLIP's inference half on torch, with the ONNX engine's interface."""

    engine = "torch"

    def __init__(self, model, precision: str = "fp32"):
        self.model, self.precision = model, precision or "fp32"
        self.name = model.config.clip_name
        self.device = str(model.device)
        self.dim = model.config.clip_config["embed_dim"]
        self.preprocess = model.preprocess
        self.logit_scale = float(model.logit_scale.detach())

    def identity(self) -> dict:
        return self.model.identity()

    def image_stages(self):
        """(image stage, tensor stage) of the transform, split before ToTensor: the first (resizing
        and cropping PIL images) is safe on a helper thread; the second runs torch ops, which
        belong on the main thread (torch ops on a second thread start a second OpenMP team, and
        the forward pass then ran ~30% slower, bench/bench_match.py)."""
        from torchvision.transforms import Compose, ToTensor
        steps = list(getattr(self.preprocess, "transforms", []))
        cut = next((i for i, step in enumerate(steps) if isinstance(step, ToTensor)), None)
        if cut is None:
            return (lambda image: image), self.preprocess
        return Compose(steps[:cut]), Compose(steps[cut:])

    def encode_images(self, pixels):
        """[N,3,H,W] tensor (or a list of [3,H,W]) -> float32 numpy [N, D]."""
        import torch
        if isinstance(pixels, (list, tuple)):
            if not pixels:
                return _empty(self.dim)
            pixels = torch.stack(list(pixels))
        with torch.inference_mode(), autocast(self.device, self.precision):
            v = self.model.encode_images(pixels.to(self.device, non_blocking=True))
        return torch.nn.functional.normalize(v.float(), dim=-1).cpu().numpy()

    def encode_texts(self, texts: list[str]):
        import torch
        if not texts:
            return _empty(self.dim)
        with torch.inference_mode(), autocast(self.device, self.precision):
            v = self.model.encode_texts(self.model.tokenize(texts).to(self.device))
        return torch.nn.functional.normalize(v.float(), dim=-1).cpu().numpy()


def _empty(dim: int):
    import numpy as np
    return np.zeros((0, dim), np.float32)
