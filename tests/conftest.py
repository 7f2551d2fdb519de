"""Shared fixtures: a tiny open_clip config (random weights) and real images that ship in packages."""
import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")      # tests never touch the network
os.environ.setdefault("ECLIP_QUIET", "1")         # no progress bars in test logs
if "ECLIP_CACHE" not in os.environ:               # ONNX exports of the test models: never in the user's cache
    import atexit
    import shutil
    import tempfile
    os.environ["ECLIP_CACHE"] = tempfile.mkdtemp(prefix="eclip-test-cache-")
    atexit.register(shutil.rmtree, os.environ["ECLIP_CACHE"], True)

TINY = {
    "embed_dim": 64,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_config_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny-vit.json"
    path.write_text(json.dumps(TINY))
    return path


def make_tiny(path, **kw):
    import torch

    from eclip.config import ExpertConfig
    from eclip.model.factory import load_model
    torch.manual_seed(0)
    experts = kw.pop("experts", ExpertConfig(n_vision=2, n_text=2, n_shared=2))
    return load_model(model=str(path), pretrained="none", device="cpu", experts=experts, **kw)


@pytest.fixture
def tiny_model(tiny_config_path):
    return make_tiny(tiny_config_path)


@pytest.fixture(scope="session")
def real_images(tmp_path_factory):
    """Named real photographs from scikit-image, written as JPEG files: {name: path}."""
    import skimage.data
    from PIL import Image
    folder = tmp_path_factory.mktemp("photos")
    out = {}
    for name in ("astronaut", "rocket", "coffee", "chelsea"):
        path = folder / f"{name}.jpg"
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(path, quality=90)
        out[name] = path
    return out


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, tiny_config_path):
    """(path, model): a tiny inference checkpoint (no experts) saved once for the session."""
    from eclip.checkpoint import save_checkpoint
    from eclip.config import ExpertConfig
    model = make_tiny(tiny_config_path, experts=ExpertConfig(enabled=False))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(model, path)
    return path, model.eval()
