"""Model options: config files, weights files, local-dir:, tags in the local cache, and fast offline failure."""
import json
import time

import pytest
import torch
from safetensors.torch import save_file

from conftest import TINY
from eclip.errors import EclipError
from eclip.config import ModelSpec
from eclip.model.factory import load_model
from eclip.model.source import resolve_source


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pretrained_weights_file_is_loaded(tiny_model, tiny_config_path, tmp_path):
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model.clip.state_dict().items()}, str(weights))
    m = load_model(model=str(tiny_config_path), pretrained=str(weights), device="cpu")
    assert _same_weights(m.clip, tiny_model.clip)


def test_local_dir_schema(tiny_model, tmp_path):
    folder = tmp_path / "my-clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in tiny_model.clip.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    m = load_model(model=f"local-dir:{folder}", device="cpu")
    assert _same_weights(m.clip, tiny_model.clip)


def test_default_model_offline_fails_at_once_with_a_way_out(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(EclipError) as e:
        load_model(device="cpu")                      # ViT-B-32 + openai, not cached here
    assert time.monotonic() - start < 5
    msg = str(e.value)
    assert "openai" in msg and "--pretrained" in msg and "\n" not in msg


def test_hf_hub_schema_offline_not_cached_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EclipError, match="hf-hub:someone/not-here"):
        load_model(model="hf-hub:someone/not-here", device="cpu")


def test_tag_found_in_local_hub_cache(monkeypatch, tmp_path):
    """A tag whose weights sit in the Hugging Face cache resolves to that file without the network,
    where huggingface_hub itself finds it."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "models--timm--vit_base_patch32_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "open_clip_model.safetensors").write_bytes(b"x")
    source = resolve_source(ModelSpec(model="ViT-B-32", pretrained="openai"))
    assert source.weights == str(snap / "open_clip_model.safetensors") and source.tag_cfg["quick_gelu"] is True
    from huggingface_hub import try_to_load_from_cache
    assert try_to_load_from_cache("timm/vit_base_patch32_clip_224.openai", "open_clip_model.safetensors",
                                  cache_dir=str(tmp_path)) == source.weights


@pytest.mark.parametrize("model,pretrained,match", [
    ("NoSuchNet-9", None, "unknown architecture"),
    ("missing.json", None, "no such model-config"),
    ("ViT-B-32", "nonsense-tag", "not a known tag"),
    ("ViT-B-32", "/nope/weights.safetensors", "no such weights file"),
])
def test_bad_model_options_are_one_line_errors(model, pretrained, match, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EclipError, match=match):
        load_model(model=model, pretrained=pretrained, device="cpu")


def test_random_weights_come_from_the_seed(tiny_config_path):
    """--pretrained none: the same seed gives the same model whatever the caller's random state, and
    the seed is part of the identity (stores of vectors compare it)."""
    a = load_model(model=str(tiny_config_path), pretrained="none", device="cpu")
    torch.rand(100)
    b = load_model(model=str(tiny_config_path), pretrained="none", device="cpu")
    c = load_model(model=str(tiny_config_path), pretrained="none", device="cpu", seed=1)
    assert _same_weights(a.clip, b.clip) and not _same_weights(a.clip, c.clip)
    assert a.identity()["seed"] == 0 and c.identity()["seed"] == 1
    state = torch.random.get_rng_state()
    load_model(model=str(tiny_config_path), pretrained="none", device="cpu")
    assert torch.equal(torch.random.get_rng_state(), state)          # the caller's stream is left alone


def test_pretrained_weights_carry_no_seed(tiny_model, tiny_config_path, tmp_path):
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model.clip.state_dict().items()}, str(weights))
    assert load_model(model=str(tiny_config_path), pretrained=str(weights), device="cpu").identity()["seed"] is None


# --- --pretrained FILE that eclip cannot or will not load: one line naming the file --------

def clip_state(model):
    return {k: v.contiguous() for k, v in model.clip.state_dict().items()}


def never_unpickle(monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("torch.load was called: eclip unpickled a file")
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.jit, "load", refuse)


@pytest.mark.parametrize("name, zipped", [("w.pt", True), ("w.bin", False), ("w.pth", True), ("w.ckpt", True)])
def test_pickle_weights_are_refused_with_how_to_convert(tiny_model, tiny_config_path, tmp_path, monkeypatch,
                                                        name, zipped):
    path = tmp_path / name
    torch.save(clip_state(tiny_model), path, _use_new_zipfile_serialization=zipped)
    never_unpickle(monkeypatch)
    with pytest.raises(EclipError) as e:
        load_model(model=str(tiny_config_path), pretrained=str(path), device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "pickle" in msg and "never" in msg
    assert "safetensors" in msg and "python -c" in msg          # says how to convert


def test_the_conversion_command_in_the_message_works(tiny_model, tiny_config_path, tmp_path):
    import re
    import subprocess
    import sys
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in clip_state(tiny_model).items()}}, path)
    with pytest.raises(EclipError) as e:
        load_model(model=str(tiny_config_path), pretrained=str(path), device="cpu")
    code = re.search(r'python -c "(.*?)"', str(e.value)).group(1)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    converted = load_model(model=str(tiny_config_path), pretrained=str(tmp_path / "w.safetensors"), device="cpu")
    assert _same_weights(converted.clip, tiny_model.clip)


def malformed_safetensors(tmp_path, kind, good: bytes):
    import struct
    if kind == "huge header length":
        return struct.pack("<Q", 2 ** 63) + good[8:]
    if kind == "bad offsets":
        n = struct.unpack("<Q", good[:8])[0]
        header = json.loads(good[8:8 + n])
        first = next(k for k in header if k != "__metadata__")
        header[first]["data_offsets"] = [0, 10 ** 12]
        raw = json.dumps(header).encode()
        return struct.pack("<Q", len(raw)) + raw + good[8 + n:]
    return good[: len(good) // 2]   # truncated


@pytest.mark.parametrize("kind", ["huge header length", "bad offsets", "truncated"])
def test_malformed_safetensors_weights_are_one_line(tiny_model, tiny_config_path, tmp_path, kind):
    good = tmp_path / "good.safetensors"
    save_file(clip_state(tiny_model), str(good))
    path = tmp_path / "bad.safetensors"
    path.write_bytes(malformed_safetensors(tmp_path, kind, good.read_bytes()))
    with pytest.raises(EclipError) as e:
        load_model(model=str(tiny_config_path), pretrained=str(path), device="cpu")
    msg = str(e.value)
    assert e.value.exit_code == 2 and "\n" not in msg and str(path) in msg and len(msg) < 400


def test_weights_of_another_architecture_name_the_file_the_model_and_the_misfit(tiny_model, tmp_path):
    path = tmp_path / "tiny64.safetensors"
    save_file(clip_state(tiny_model), str(path))
    narrow = json.loads(json.dumps(TINY))
    narrow["text_cfg"]["width"] = 32                  # open_clip: AssertionError "text pos_embed width changed!"
    config = tmp_path / "narrow.json"
    config.write_text(json.dumps(narrow))
    with pytest.raises(EclipError) as e:
        load_model(model=str(config), pretrained=str(path), device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and str(config) in msg and "do not fit" in msg
    assert "positional_embedding" in msg and "[77, 64]" in msg and "[77, 32]" in msg


def test_numpy_weights_for_a_clip_model_are_one_line(tiny_config_path, tmp_path):
    import numpy as np
    path = tmp_path / "big_vision.npz"
    np.savez(path, **{"params/img/embedding/kernel": np.zeros((16, 16, 3, 64), np.float32)})
    with pytest.raises(EclipError) as e:               # open_clip: AttributeError
        load_model(model=str(tiny_config_path), pretrained=str(path), device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "do not fit" in msg


def test_a_file_that_is_no_weights_at_all(tiny_config_path, tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("just some text, long enough to have a header length")
    with pytest.raises(EclipError, match="notes.safetensors"):
        load_model(model=str(tiny_config_path), pretrained=str(path), device="cpu")


def test_registered_configs_never_follow_a_link_planted_in_the_temporary_folder(tmp_path, monkeypatch):
    import os
    import tempfile

    import open_clip

    from eclip.model.factory import register_config
    tmp, victim = tmp_path / "tmp", tmp_path / "victim"
    tmp.mkdir(), victim.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    (tmp / f"eclip-configs-{os.getuid()}").symlink_to(victim)
    cfg = {**TINY, "embed_dim": 48}       # a config no other test registered
    name = register_config(cfg)
    assert list(victim.iterdir()) == [] and list(tmp.iterdir()) == [tmp / f"eclip-configs-{os.getuid()}"]
    assert open_clip.get_model_config(name) == cfg
