"""Input errors that need no model are reported before torch, open_clip or ONNX Runtime load.

Every case runs the real command line in ONE subprocess in which importing torch, open_clip or
onnxruntime raises (their sys.modules entries are None): a case that reached for a model would
end as an internal error (exit 1), not as the one-line input error (exit 2) asserted here.
"""
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from eclip.cli import app

RUNNER = r'''
import contextlib, io, json, sys
for name in ("torch", "open_clip", "onnxruntime", "torchvision", "transformers"):
    sys.modules[name] = None
from eclip.cli import main
results = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    sys.argv = ["eclip", *args]
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main()
        except SystemExit as e:
            code = e.code
    results.append({"code": code, "stderr": err.getvalue()})
print(json.dumps(results))
'''


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, checkpoint, real_images, tiny_config_path):
    tmp = tmp_path_factory.mktemp("early")
    photo = str(real_images["astronaut"])
    run_dir = tmp / "run"
    run_dir.mkdir()
    (run_dir / "best.safetensors").write_bytes(checkpoint[0].read_bytes())
    gallery = tmp / "images-only"
    result = CliRunner(mix_stderr=False).invoke(app, ["embed", "--checkpoint", str(checkpoint[0]), "--images", photo,
                                                      "--output", str(gallery), "--workers", "0"])
    assert result.exit_code == 0, result.stderr
    (tmp / "notes.txt").write_text("not a photo")
    pair = json.dumps({"image": photo, "text": "an astronaut"})
    (tmp / "pairs-train.jsonl").write_text(pair + "\n")                      # no pairs-val.jsonl beside it
    (tmp / "broken.jsonl").write_text(pair + "\n" + '{"image": "a.jpg", "text": "tab\there"}\n')
    return {"tmp": tmp, "photo": photo, "ckpt": str(checkpoint[0]), "run": run_dir, "gallery": gallery,
            "tiny": str(tiny_config_path)}


def test_input_errors_exit_2_without_loading_a_model(inputs, tmp_path):
    i = inputs
    tmp, ckpt, photo = i["tmp"], i["ckpt"], i["photo"]
    train = ["--model", i["tiny"], "--pretrained", "none"]
    cases = [
        (["match", "-i", str(tmp / "missing.jpg"), "a caption", "--checkpoint", ckpt], "missing.jpg: no such image file"),
        (["match", "-i", str(tmp), "a caption", "--checkpoint", ckpt], "is a folder, not an image file"),
        (["match", str(tmp / "notes.txt"), "a caption", "--checkpoint", ckpt], "notes.txt: not an image"),
        (["match", "--gallery", str(i["gallery"]), "--top-k", "0", "a caption"], "--top-k 0: must be at least 1"),
        (["match", "--gallery", str(i["gallery"]), photo], "holds no text embeddings"),
        (["match", "--checkpoint", str(i["run"]), photo, "a caption"],
         f"is a folder, not a checkpoint file; did you mean {i['run'] / 'best.safetensors'}?"),
        (["match", "--checkpoint", str(tmp), photo, "a caption"], "no best.safetensors inside"),
        (["match", photo, "a caption"], "not in the local cache"),                  # ViT-B-32 openai, offline
        (["train", "--dataset", str(tmp / "pairs-train.jsonl"), "--output", str(tmp_path / "r1"), *train],
         "too few to hold some out"),                 # one image: none to hold out for validation
        (["train", "--dataset", str(tmp / "broken.jsonl"), "--val-dataset", str(tmp / "pairs-train.jsonl"),
          "--output", str(tmp_path / "r2"), *train], "line 2: invalid JSON (Invalid control character at column 32)"),
        (["train", "--dataset", str(tmp / "pairs-train.jsonl"), "--no-val", "--batch-size", "1",
          "--accum-freq", "2", "--output", str(tmp_path / "r3"), *train], "--accum-freq 2: does not divide --batch-size 1"),
        (["train", "--dataset", str(tmp / "pairs-train.jsonl"), "--no-val", "--batch-size", "1",
          "--lock-image-unlocked-groups", "9", "--output", str(tmp_path / "r4"), *train],
         "--lock-image-unlocked-groups 9: the image tower has 4 layer groups"),
        (["train", "--dataset", str(tmp / "pairs-train.jsonl"), "--no-val", "--batch-size", "1", "--lock-image",
          "--lock-image-freeze-bn-stats", "--output", str(tmp_path / "r5"), *train], "has no batch norm"),
        (["train", "--dataset", str(tmp / "pairs-train.jsonl"), "--no-val", "--batch-size", "1", "--model", "RN50",
          "--pretrained", "none", "--grad-checkpointing", "--output", str(tmp_path / "r6")],
         "--grad-checkpointing: the image tower (ModifiedResNet) cannot checkpoint"),
        (["embed", "--images", str(tmp / "nowhere"), "--output", str(tmp_path / "e"), "--checkpoint", ckpt],
         "no such folder"),
        (["mach", photo, "a caption"], "did you mean 'match'?"),
    ]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "HF_HUB_CACHE": str(tmp_path / "hub"), "ECLIP_QUIET": "1", "ECLIP_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", RUNNER, json.dumps([c[0] for c in cases])], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for (args, message), got in zip(cases, results):
        assert got["code"] == 2 and message in got["stderr"], (args, got)
        if args[0] != "mach":       # click's usage error is a framed block; ours are one line
            assert got["stderr"].startswith("eclip: error: ") and got["stderr"].count("\n") == 1, got
    offline = results[7]["stderr"]
    assert "--pretrained none" in offline and "--model" in offline and "model-config JSON with --pretrained" \
        not in offline
