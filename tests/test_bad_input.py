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
