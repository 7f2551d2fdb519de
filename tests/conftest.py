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


@pytest.fixture(scope="session")
def serve_gallery(tmp_path_factory, checkpoint, real_images):
    """(folder, captions): a gallery `eclip embed` wrote with the session checkpoint (4 photos, 4 captions)."""
    from eclip.config import ModelSpec
    from eclip.embed import embed
    out = tmp_path_factory.mktemp("serve") / "gallery"
    captions = out.parent / "captions.txt"
    captions.write_text("an astronaut\na rocket launch\na cup of coffee\na cat on a sofa\n")
    embed(ModelSpec(checkpoint=str(checkpoint[0]), device="cpu"), out, images=str(real_images["astronaut"].parent),
          texts=str(captions), dtype="fp32", workers=0)
    return out, captions.read_text().splitlines()


@pytest.fixture(scope="session")
def live_server(checkpoint, serve_gallery):
    """`eclip serve` running in this process (uvicorn on a thread, a free port on 127.0.0.1), no token."""
    import threading

    from eclip.config import ModelSpec
    from eclip.embedstore import open_store
    from eclip.match import Matcher
    from eclip.serve import Server, ServeOptions
    matcher = Matcher.from_spec(ModelSpec(checkpoint=str(checkpoint[0]), device="cpu"))
    server = Server(matcher, ServeOptions(port=0, batch_wait_ms=200), open_store(serve_gallery[0]))
    thread = threading.Thread(target=server.run, name="eclip-serve-test", daemon=True)
    thread.start()
    assert server.started.wait(60), "the test server did not start"
    yield server
    server.stop()
    thread.join(30)


def mounted_tmpfs(folder, options: str, instead: str):
    """Yield `folder` with a tmpfs mounted on it (`mount -o OPTIONS`: needs root, and a kernel that lets
    this container mount), unmounted afterwards; skip the test, naming the test that covers it
    `instead`, where mounting is not possible."""
    import subprocess
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root); {instead} covers the handling")
    yield folder
    subprocess.run(["umount", "--lazy", str(folder)], check=True)   # lazy: a traceback may still hold a file
