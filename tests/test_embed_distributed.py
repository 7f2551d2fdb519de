"""`torchrun --nproc_per_node 2 -m eclip embed` on the CPU: every input is embedded exactly once."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from eclip.cli import app
from eclip.embedstore import open_store


@pytest.mark.slow
def test_two_processes_embed_every_input_exactly_once(tmp_path, tiny_config_path, real_images):
    from conftest import make_tiny

    from eclip.checkpoint import save_checkpoint
    checkpoint = tmp_path / "tiny.safetensors"
    save_checkpoint(make_tiny(tiny_config_path), checkpoint)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in range(3):        # 12 images, one of them broken, 7 captions: shards split unevenly
        for name, src in real_images.items():
            shutil.copy(src, folder / f"{name}-{k}.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    captions = tmp_path / "caps.jsonl"
    captions.write_text("".join(json.dumps({"id": f"c{i}", "text": f"caption number {i}"}) + "\n" for i in range(7)))
    args = ["embed", "--checkpoint", str(checkpoint), "--images", str(folder), "--texts", str(captions),
            "--shard-size", "2", "--batch-size", "2", "--workers", "0"]

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ECLIP_QUIET": "1"}
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "eclip", *args,
                           "--output", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    store = open_store(tmp_path / "two")
    ids = store.table("images").column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 12
    assert sorted(ids) == sorted(os.path.abspath(p) for p in folder.glob("*.jpg") if p.name != "broken.jpg")
    assert store.table("texts").column("id").to_pylist() == [f"c{i}" for i in range(7)]
    ranks = {entry["vectors"].rsplit("-r", 1)[1] for entry in store.manifest["images"]["shards"]}
    assert ranks == {"0.safetensors", "1.safetensors"}          # both processes wrote shards
    assert [json.loads(line)["image"].endswith("broken.jpg")
            for line in (tmp_path / "two" / "errors.jsonl").read_text().splitlines()] == [True]

    one = CliRunner().invoke(app, args + ["--output", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    single = open_store(tmp_path / "one")
    assert single.table("images").column("id").to_pylist() == ids
    np.testing.assert_allclose(store.vectors("images"), single.vectors("images"), atol=1e-3)
    np.testing.assert_allclose(store.vectors("texts"), single.vectors("texts"), atol=1e-3)
