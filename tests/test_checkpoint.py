"""Checkpoints: bit-exact round trip from the header alone; bad files rejected with one clear line."""
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from eclip.checkpoint import read_header, save_checkpoint
from eclip.model.factory import load_checkpoint
from eclip.errors import EclipError


def test_round_trip_is_bit_exact_and_needs_only_the_file(tiny_model, tmp_path):
    path = save_checkpoint(tiny_model, tmp_path / "model.safetensors")
    loaded = load_checkpoint(path)
    assert loaded.config == tiny_model.config
    a, b = tiny_model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert loaded.identity()["checkpoint_sha256"] and len(loaded.identity()["checkpoint_sha256"]) == 64
    pixels = torch.randn(2, 3, 64, 64)
    assert torch.equal(tiny_model.encode_images(pixels), loaded.encode_images(pixels))
    meta = read_header(path)
    assert meta["format"] == "eclip" and json.loads(meta["config"])["experts"]["n_vision"] == 2


def test_write_is_atomic_no_temp_files_left(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path / "a.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_truncated_file_is_rejected(tiny_model, tmp_path):
    path = save_checkpoint(tiny_model, tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(EclipError, match="m.safetensors") as e:
        load_checkpoint(path)
    assert e.value.exit_code == 2


def test_foreign_safetensors_is_rejected(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(EclipError, match="not an eclip checkpoint"):
        load_checkpoint(path)


def test_garbage_and_missing_files_are_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(EclipError, match="notes.txt"):
        load_checkpoint(tmp_path / "notes.txt")
    with pytest.raises(EclipError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "absent.safetensors")


def test_weights_that_do_not_fit_the_header_are_rejected(tiny_model, tmp_path):
    config = tiny_model.config.to_dict()
    config["experts"]["n_vision"] = 3                 # header promises an expert the weights lack
    meta = {"format": "eclip", "eclip_version": "0", "config": json.dumps(config)}
    state = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    path = tmp_path / "mismatch.safetensors"
    save_file(state, str(path), metadata=meta)
    with pytest.raises(EclipError, match="do not fit"):
        load_checkpoint(path)


def rewrite_header(model, path, change):
    config = model.config.to_dict()
    change(config)
    meta = {"format": "eclip", "eclip_version": "0", "config": json.dumps(config)}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("field, change", [
    ("tokenizer", lambda c: c.update(tokenizer=5)),
    ("preprocess.size", lambda c: c["preprocess"].update(size="big")),
    ("preprocess.mean", lambda c: c["preprocess"].update(mean="red")),
    ("clip_config", lambda c: c.update(clip_config="ViT-B-32")),
    ("clip_config.embed_dim", lambda c: c["clip_config"].pop("embed_dim")),
    ("clip_config.vision_cfg", lambda c: c["clip_config"].update(vision_cfg=[1, 2])),
    ("context_length", lambda c: c.update(context_length="77")),
    ("experts.n_vision", lambda c: c["experts"].update(n_vision="two")),
    ("loss.eta", lambda c: c["loss"].update(eta=None)),
    ("loss.negatives", lambda c: c["loss"].update(negatives="hardest")),
    ("experts", lambda c: c.update(experts=3)),
    ("bogus", lambda c: c.update(bogus=1)),
])
def test_header_config_of_the_wrong_type_names_file_and_field(tiny_model, tmp_path, field, change):
    path = rewrite_header(tiny_model, tmp_path / "odd.safetensors", change)
    with pytest.raises(EclipError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert e.value.exit_code == 2 and "\n" not in msg and len(msg) < 300, msg
    assert msg.startswith(f"{path}: ") and f"config.{field}" in msg, msg


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("where", ["config", "header"])
def test_deeply_nested_json_is_refused_naming_the_file(tiny_model, tmp_path, where):
    """100,000 levels of nesting: exit 2 with the file's name, not a RecursionError (exit 1)."""
    from typer.testing import CliRunner

    from eclip.cli import app
    if where == "config":
        path = tmp_path / "deep.safetensors"
        meta = {"format": "eclip", "eclip_version": "0", "config": DEEP}
        save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(path), metadata=meta)
    else:   # the safetensors header itself
        path = tmp_path / "deep-header.safetensors"
        text = ('{"__metadata__": {"format": "eclip"}, "x": ' + DEEP + "}").encode()
        path.write_bytes(struct.pack("<Q", len(text)) + text)
    with pytest.raises(EclipError) as e:
        load_checkpoint(path)
    assert e.value.exit_code == 2 and str(e.value).startswith(f"{path}: ") and "nested" in str(e.value)
    result = CliRunner().invoke(app, ["match", "--checkpoint", str(path), str(path), "a caption"])
    assert result.exit_code == 2 and str(path) in result.output, (result.output, result.exception)
