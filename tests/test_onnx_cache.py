"""The ONNX cache's faults: a killed export's leftovers, a cache that cannot be written (read-only,
full disk), a copy damaged without changing its size."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import mounted_tmpfs
from eclip.config import ModelSpec
from eclip.errors import EclipError
from eclip.runtime.engine import TorchEncoder, load_encoder
from eclip.runtime.onnxclip import OnnxCLIP

ROOT = Path(__file__).parent.parent


def entries(cache):
    return sorted(p for p in (Path(cache) / "onnx").iterdir() if not p.name.startswith("."))


def temporaries(cache):
    return sorted(p for p in (Path(cache) / "onnx").iterdir() if p.name.startswith("."))


def copy_of(checkpoint, folder, name):
    """The session checkpoint under another path: another cache entry, exported anew."""
    folder.mkdir(exist_ok=True)
    return ModelSpec(checkpoint=str(shutil.copy(checkpoint[0], folder / name)), device="cpu")


PAUSED_EXPORT = """
import sys, time
import eclip.runtime.onnx_cache as cache
from eclip.config import ModelSpec
from eclip.runtime.engine import load_encoder
cache._compare = lambda *a: time.sleep(600)     # stop once the towers are written, as if still checking
load_encoder(ModelSpec(checkpoint=sys.argv[1], device="cpu"))
"""


def test_a_killed_exports_temporary_folder_goes_at_the_next_export_and_a_live_one_stays(
        tmp_path, monkeypatch, checkpoint):
    cache = tmp_path / "cache"
    monkeypatch.setenv("ECLIP_CACHE", str(cache))
    spec = copy_of(checkpoint, tmp_path / "models", "a.safetensors")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ECLIP_QUIET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_EXPORT, spec.checkpoint], env=env,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ((cache / "onnx").is_dir() and any((t / "text.onnx.data").is_file() for t in temporaries(cache))):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        [live] = temporaries(cache)
        load_encoder(copy_of(checkpoint, tmp_path / "models", "b.safetensors"))   # another export
        assert live.is_dir()                                        # its writer is alive: kept
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert live.is_dir()
    assert isinstance(load_encoder(copy_of(checkpoint, tmp_path / "models", "c.safetensors")), OnnxCLIP)
    assert temporaries(cache) == [] and len(entries(cache)) == 2


@pytest.fixture
def read_only(tmp_path):
    """A read-only filesystem."""
    yield from mounted_tmpfs(tmp_path / "ro", "ro,size=1m", "test_full_disk_during_the_export")


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB filesystem: smaller than the tiny model's ONNX copy (~14 MB)."""
    yield from mounted_tmpfs(tmp_path / "small", "size=2m", "test_full_disk_during_the_export")


def falls_back_with_one_note(spec, capsys, where: Path, reason: str):
    with pytest.MonkeyPatch.context() as quiet_off:
        quiet_off.delenv("ECLIP_QUIET", raising=False)
        capsys.readouterr()
        encoder = load_encoder(spec)
        notes = capsys.readouterr().err
    assert isinstance(encoder, TorchEncoder)
    lines = [line for line in notes.splitlines() if "torch" in line]
    assert len(lines) == 1 and str(where) in lines[0] and reason in lines[0], notes
    with pytest.raises(EclipError) as e:
        load_encoder(spec, "onnx")
    assert e.value.exit_code == 2 and str(where) in str(e.value) and reason in str(e.value)
    assert "\n" not in str(e.value)


def test_read_only_cache_runs_on_torch_with_one_note(read_only, monkeypatch, checkpoint, capsys):
    monkeypatch.setenv("ECLIP_CACHE", str(read_only))
    spec = ModelSpec(checkpoint=str(checkpoint[0]), device="cpu")
    falls_back_with_one_note(spec, capsys, read_only, "read-only")


def test_full_disk_during_the_export_on_a_real_small_filesystem(small_disk, monkeypatch, checkpoint, capsys):
    monkeypatch.setenv("ECLIP_CACHE", str(small_disk))
    spec = ModelSpec(checkpoint=str(checkpoint[0]), device="cpu")
    falls_back_with_one_note(spec, capsys, small_disk / "onnx", "no space left on device")
    assert entries(small_disk) == [] and temporaries(small_disk) == []   # nothing half-written, nothing
    # recorded as "unsupported": once there is room, the copy is written
    monkeypatch.setenv("ECLIP_CACHE", str(small_disk.parent / "roomy"))
    assert isinstance(load_encoder(spec), OnnxCLIP)


def test_full_disk_during_the_export(tmp_path, monkeypatch, checkpoint, capsys):
    """Without a small filesystem: the tracer's write fails with ENOSPC after writing part of its file."""
    import eclip.runtime.onnx_cache as onnx_cache
    cache = tmp_path / "cache"
    monkeypatch.setenv("ECLIP_CACHE", str(cache))
    real_trace = onnx_cache.trace_towers

    def full_disk(model, work):
        (work / "image.onnx").write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(work / "image.onnx"))

    monkeypatch.setattr(onnx_cache, "trace_towers", full_disk)
    spec = ModelSpec(checkpoint=str(checkpoint[0]), device="cpu")
    falls_back_with_one_note(spec, capsys, cache / "onnx", "no space left on device")
    assert entries(cache) == [] and temporaries(cache) == []
    monkeypatch.setattr(onnx_cache, "trace_towers", real_trace)
    assert isinstance(load_encoder(spec), OnnxCLIP)


def test_cli_with_a_read_only_cache(read_only, monkeypatch, checkpoint, real_images):
    from typer.testing import CliRunner

    from eclip.cli import app
    monkeypatch.setenv("ECLIP_CACHE", str(read_only))
    argv = ["match", "--checkpoint", str(checkpoint[0]), str(real_images["rocket"]), "a rocket", "--json"]
    assert CliRunner().invoke(app, argv).exit_code == 0
    forced = CliRunner().invoke(app, [*argv, "--engine", "onnx"])
    assert forced.exit_code == 2 and str(read_only) in forced.output, forced.output


def test_same_size_damage_is_detected_by_its_checksum_and_rebuilt(tmp_path, monkeypatch, checkpoint, real_images):
    import eclip.runtime.onnx_cache as onnx_cache
    from eclip.data.images import load_image
    monkeypatch.setenv("ECLIP_CACHE", str(tmp_path / "cache"))
    spec = ModelSpec(checkpoint=str(checkpoint[0]), device="cpu")
    encoder = load_encoder(spec)
    pixels = [encoder.preprocess(load_image(p)) for p in real_images.values()]
    want = encoder.encode_images(pixels)
    [entry] = entries(tmp_path / "cache")
    data = entry / "image.onnx.data"
    size = data.stat().st_size
    with open(data, "r+b") as f:            # weights changed in place: same size, still a valid model
        f.seek(size // 2)
        chunk = f.read(4096)
        f.seek(size // 2)
        f.write(bytes(255 - b for b in chunk))
    assert data.stat().st_size == size

    hashed = []
    from eclip.checkpoint import sha256_file as real_sha
    monkeypatch.setattr(onnx_cache, "sha256_file", lambda path: hashed.append(Path(path).name) or real_sha(path),
                        raising=False)
    got = load_encoder(spec).encode_images(pixels)
    np.testing.assert_allclose(got, want, atol=1e-6)                # rebuilt, not silently wrong
    assert "image.onnx.data" in hashed
    meta = json.loads((entry / "meta.json").read_text())
    assert real_sha(data) == meta["sha256"]["image.onnx.data"]

    hashed.clear()
    load_encoder(spec)                                              # unchanged since: no file hashed again
    assert hashed == []
