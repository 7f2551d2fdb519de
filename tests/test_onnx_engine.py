"""The ONNX engine: the same pixels, token ids and vectors as the torch/open_clip path; its cached
export is rebuilt when the weights change or the files are damaged; torch stays where it must."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from eclip.config import ModelSpec
from eclip.errors import EclipError
from eclip.runtime.engine import TorchEncoder, choose_engine, load_encoder
from eclip.runtime.onnxclip import OnnxCLIP
from eclip.model.source import resolve_source
from eclip.runtime.transform import EvalTransform
from test_tokenizer import CAPTIONS


@pytest.fixture(scope="module")
def photos_and_flags(real_images):
    """Real photographs (scikit-image) and national flags (flagpy, 90 x 180), as PIL images."""
    from PIL import Image

    from eclip.data.demo_set import _package_dir, read_flag
    from eclip.data.images import load_image
    images = [load_image(p) for p in real_images.values()]
    flags = sorted((_package_dir("flagpy") / "flags").glob("*"))[:6]
    return images + [Image.fromarray(read_flag(p)) for p in flags]


@pytest.mark.parametrize("cfg", [
    {"size": 224},                                                               # ViT-B-32's default
    {"size": 64, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3},
    {"size": 200, "resize_mode": "squash"},
    {"size": 400},                                                               # flags smaller: padded crop
])
def test_preprocessing_is_open_clips_eval_transform_bit_for_bit(photos_and_flags, cfg):
    from open_clip.transform import PreprocessCfg, image_transform_v2
    full = {**json.loads(json.dumps(PreprocessCfg().__dict__)), **cfg}
    theirs = image_transform_v2(PreprocessCfg(**full), is_train=False)
    ours = EvalTransform(full)
    for image in photos_and_flags:
        a, b = ours(image), theirs(image).numpy()
        assert a.dtype == np.float32 and a.shape == b.shape and np.array_equal(a, b)


def _onnx(spec):
    encoder = load_encoder(spec)
    assert isinstance(encoder, OnnxCLIP)
    return encoder


def test_vectors_equal_the_torch_path_on_real_images(checkpoint, photos_and_flags):
    path, model = checkpoint
    encoder = _onnx(ModelSpec(checkpoint=str(path), device="cpu"))
    with torch.no_grad():
        want_images = model.encode_images(torch.stack([model.preprocess(im) for im in photos_and_flags])).numpy()
        want_texts = model.encode_texts(model.tokenize(CAPTIONS)).numpy()
    got_images = encoder.encode_images([encoder.preprocess(im) for im in photos_and_flags])
    np.testing.assert_allclose(got_images, want_images, atol=1e-4, rtol=0)
    np.testing.assert_allclose(encoder.encode_texts(CAPTIONS), want_texts, atol=1e-4, rtol=0)
    assert encoder.logit_scale == pytest.approx(float(model.logit_scale.detach()))
    torch_encoder = load_encoder(ModelSpec(checkpoint=str(path), device="cpu"), "torch")
    assert encoder.identity() == torch_encoder.identity()             # same gallery, either engine


def test_weights_file_gives_the_same_vectors(tmp_path, tiny_config_path, checkpoint, real_images):
    from safetensors.torch import save_file
    _, model = checkpoint
    weights = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.clip.state_dict().items()}, str(weights))
    spec = ModelSpec(model=str(tiny_config_path), pretrained=str(weights), device="cpu")
    encoder = _onnx(spec)
    torch_encoder = load_encoder(spec, "torch")
    assert isinstance(torch_encoder, TorchEncoder) and encoder.identity() == torch_encoder.identity()
    from eclip.data.images import load_image
    pixels = [encoder.preprocess(load_image(p)) for p in real_images.values()]
    np.testing.assert_allclose(encoder.encode_images(pixels),
                               torch_encoder.encode_images([torch.from_numpy(p) for p in pixels]), atol=1e-4)


def _entries(root):
    return sorted(p for p in (Path(root) / "onnx").iterdir() if not p.name.startswith("."))


def test_changed_weights_get_a_new_export_and_the_old_one_goes(tmp_path, monkeypatch, tiny_config_path):
    from conftest import make_tiny
    from eclip.checkpoint import save_checkpoint
    from eclip.config import ExpertConfig
    monkeypatch.setenv("ECLIP_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model.safetensors"
    first = make_tiny(tiny_config_path, experts=ExpertConfig(enabled=False))
    save_checkpoint(first, path)
    spec = ModelSpec(checkpoint=str(path), device="cpu")
    _onnx(spec)
    [old] = _entries(tmp_path / "cache")
    with torch.no_grad():
        for p in first.clip.parameters():
            p.mul_(1.5)
    save_checkpoint(first, path)                                  # same path, new weights
    encoder = _onnx(spec)
    [new] = _entries(tmp_path / "cache")
    assert new != old
    with torch.no_grad():
        want = first.encode_texts(first.tokenize(["a rocket"])).numpy()
    np.testing.assert_allclose(encoder.encode_texts(["a rocket"]), want, atol=1e-4)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_export_is_detected_and_rebuilt(tmp_path, monkeypatch, checkpoint, damage):
    monkeypatch.setenv("ECLIP_CACHE", str(tmp_path / "cache"))
    spec = ModelSpec(checkpoint=str(checkpoint[0]), device="cpu")
    want = _onnx(spec).encode_texts(["a cat"])
    [entry] = _entries(tmp_path / "cache")
    target = entry / ("image.onnx.data" if damage == "truncate" else "text.onnx")
    size = target.stat().st_size
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[: size // 2])
    else:                                                         # same size, not a model any more
        target.write_bytes(b"\0" * size)
    encoder = _onnx(spec)
    np.testing.assert_allclose(encoder.encode_texts(["a cat"]), want, atol=1e-6)
    assert (entry / "image.onnx.data").stat().st_size == json.loads((entry / "meta.json").read_text())["sizes"][
        "image.onnx.data"]


def test_a_model_onnx_cannot_reproduce_runs_on_torch(tmp_path, monkeypatch, tiny_config_path):
    """Here: preprocessing open_clip does with torchvision only ("longest"); the entry says why,
    and the next load goes straight to torch."""
    from conftest import make_tiny
    from eclip.checkpoint import save_checkpoint
    from eclip.config import ExpertConfig
    monkeypatch.setenv("ECLIP_CACHE", str(tmp_path / "cache"))
    model = make_tiny(tiny_config_path, experts=ExpertConfig(enabled=False))
    model.config.preprocess = {**model.config.preprocess, "resize_mode": "longest"}
    save_checkpoint(model, tmp_path / "longest.safetensors")
    spec = ModelSpec(checkpoint=str(tmp_path / "longest.safetensors"), device="cpu")
    assert isinstance(load_encoder(spec), TorchEncoder)
    [entry] = _entries(tmp_path / "cache")
    assert "torchvision" in json.loads((entry / "meta.json").read_text())["unsupported"]
    with pytest.raises(EclipError, match="does not run on ONNX Runtime"):
        load_encoder(spec, "onnx")


@pytest.mark.parametrize("change, engine", [
    ({"precision": "fp16"}, "torch"),
    ({"precision": "bf16"}, "torch"),
    ({"device": "cuda"}, "torch"),
    ({"device": "cuda:1"}, "torch"),
    ({}, "onnx"),
])
def test_engine_choice(checkpoint, change, engine, monkeypatch):
    from dataclasses import replace
    monkeypatch.delenv("ECLIP_ENGINE", raising=False)
    spec = replace(ModelSpec(checkpoint=str(checkpoint[0]), device="cpu"), **change)
    assert choose_engine(spec, resolve_source(spec)) == engine
    assert choose_engine(spec, resolve_source(spec), "torch") == "torch"
    if engine == "torch":
        with pytest.raises(EclipError, match="--engine onnx"):
            choose_engine(spec, resolve_source(spec), "onnx")
    monkeypatch.setenv("ECLIP_ENGINE", "torch")
    assert choose_engine(spec, resolve_source(spec)) == "torch"


def test_random_weights_stay_on_torch(tiny_config_path):
    spec = ModelSpec(model=str(tiny_config_path), pretrained="none", device="cpu")
    assert choose_engine(spec, resolve_source(spec)) == "torch"
    assert isinstance(load_encoder(spec), TorchEncoder)
