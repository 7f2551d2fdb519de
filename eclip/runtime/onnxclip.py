"""CLIP towers exported to ONNX (eclip.runtime.onnx_cache), run by ONNX Runtime on the CPU.

The inference half of EntityCLIP without torch or open_clip: the tokenizer
(eclip.runtime.tokenizer) and the preprocessing (eclip.runtime.transform) are numpy/PIL
equivalents of open_clip's, and the two graphs end in the L2 normalisation, so the features
equal the torch engine's to ~1e-6 (tests/test_onnx_engine.py checks 1e-4 on real photos).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from eclip.runtime.tokenizer import ClipTokenizer
from eclip.runtime.transform import EvalTransform


def cpu_threads() -> int:
    """Threads for the forward pass: $OMP_NUM_THREADS as torch reads it, else the CPUs we may use."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def session(path: Path, throughput: bool):
    """An ONNX Runtime CPU session. Weights stay in the mmapped external data file; for a
    single answer (throughput=False) MatMul weights are not pre-packed, which halves session
    start-up; for embedding they are (faster batches), and idle workers do not spin so the image
    decoding processes get the CPU."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = cpu_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if throughput:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    else:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxCLIP:
    """encode_images / encode_texts on ONNX Runtime; the interface of eclip.runtime.engine.TorchEncoder."""

    engine = "onnx"
    device = "cpu"
    precision = "fp32"

    def __init__(self, folder, meta: dict, identity: dict, throughput: bool = False):
        self.folder, self.meta = Path(folder), meta
        self.dim = int(meta["embed_dim"])
        self.name = meta.get("name", "")
        self.logit_scale = float(meta["logit_scale"])
        self.transform = EvalTransform(meta["preprocess"])
        tok = meta["tokenizer"]
        self.tokenizer = None
        self._tokenizer_args = (tok["context_length"], tok.get("clean", "lower"), tok.get("additional_special_tokens"))
        self._identity = dict(identity)
        self.image_session = session(self.folder / "image.onnx", throughput)
        self.text_session = session(self.folder / "text.onnx", throughput)

    def identity(self) -> dict:
        """What made these vectors, as EntityCLIP.identity() says it (same keys, same values)."""
        if self._identity.get("checkpoint") and not self._identity.get("checkpoint_sha256"):
            from eclip.checkpoint import sha256_file
            self._identity["checkpoint_sha256"] = sha256_file(self._identity["checkpoint"])
        return {**self._identity, "preprocess": self.meta["preprocess"]}

    def preprocess(self, image) -> np.ndarray:
        return self.transform(image)

    def image_stages(self):
        """Both halves are PIL/numpy work, safe on a helper thread: all of it goes first."""
        return self.transform, (lambda pixels: pixels)

    def tokenize(self, texts) -> np.ndarray:
        if self.tokenizer is None:   # the vocabulary is read on first use: image-only work skips it
            self.tokenizer = ClipTokenizer(*self._tokenizer_args)
        return self.tokenizer(texts)

    def encode_images(self, pixels) -> np.ndarray:
        """[N,3,H,W] float32 (array, tensor or list of [3,H,W]) -> float32 [N, D], L2-normalised."""
        if isinstance(pixels, (list, tuple)):
            if not pixels:
                return np.zeros((0, self.dim), np.float32)
            pixels = np.stack([np.asarray(p) for p in pixels])
        pixels = np.ascontiguousarray(np.asarray(pixels), dtype=np.float32)
        return self.image_session.run(None, {"pixels": pixels})[0]

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return self.text_session.run(None, {"tokens": self.tokenize(texts)})[0]
