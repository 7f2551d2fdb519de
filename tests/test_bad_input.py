"""Bad input through the command line: exit 2 and one line on stderr naming the input (README,
"Exit codes"), never an internal error."""
import pytest
from typer.testing import CliRunner

from eclip.cli import app

LATIN1 = "Angela Merkel in K\u00f6ln".encode("latin-1")   # 0xf6: not UTF-8


def run_cli(argv):
    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:
        runner = CliRunner()
    return runner.invoke(app, [str(a) for a in argv])


def one_error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eclip: error: "), result.stderr
    return lines[0][len("eclip: error: "):]


@pytest.fixture
def latin1_tables(tmp_path):
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_bytes(b'{"image": "a.jpg", "text": "fine"}\n{"image": "b.jpg", "text": "' + LATIN1 + b'"}\n')
    csv = tmp_path / "pairs.csv"
    csv.write_bytes(b'image,text\na.jpg,fine\nb.jpg,"' + LATIN1 + b'"\n')
    return {"jsonl": (jsonl, 2), "csv": (csv, 3)}


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
@pytest.mark.parametrize("command", ["train", "embed", "evaluate", "explain"])
def test_dataset_that_is_not_utf8_in_every_subcommand(command, kind, latin1_tables, tiny_config_path, tmp_path):
    path, line = latin1_tables[kind]
    model = ["--model", tiny_config_path, "--pretrained", "none", "--device", "cpu"]
    argv = {"train": ["train", "--dataset", path, "--val-dataset", path, "--output", tmp_path / "run", *model],
            "embed": ["embed", "--dataset", path, "--output", tmp_path / "vecs", *model],
            "evaluate": ["evaluate", "--dataset", path, *model],
            "explain": ["explain", "--dataset", path, "--output", tmp_path / "c.jsonl", "--dry-run"]}[command]
    message = one_error_line(run_cli(argv))
    assert message.startswith(f"{path} line {line}: not UTF-8"), message


BLOCKED = r'''
import sys
for name in ("torch", "open_clip", "onnxruntime", "torchvision", "transformers", "accelerate"):
    sys.modules[name] = None      # importing any of them now fails: an input check must not need them
from eclip.cli import main
sys.argv = ["eclip", *sys.argv[1:]]
main()
'''


def test_train_checks_its_validation_file_before_importing_torch(tmp_path, real_images, tiny_config_path):
    """`train --val-dataset MISSING` was reported after 17 s of imports; it needs no model."""
    import json
    import os
    import subprocess
    import sys
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"image": str(p), "text": name}) + "\n" for name, p in real_images.items()))
    missing = tmp_path / "no-such-val.jsonl"
    env = {**os.environ, "ECLIP_QUIET": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", BLOCKED, "train", "--dataset", str(pairs), "--val-dataset",
                           str(missing), "--model", str(tiny_config_path), "--pretrained", "none", "--output",
                           str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip() == f"eclip: error: {missing}: dataset file not found"
    assert not (tmp_path / "run").exists()
