"""`--help` of every subcommand as an 80-column terminal shows it: nothing cut off, no
`[default: None]`, no shown default that contradicts the help text, examples not wrapped."""
import os
import re
import subprocess
import sys

import click
import pytest
import typer.main

from eclip.cli import app

COMMANDS = ["", "explain", "train", "embed", "match", "evaluate", "serve", "export"]


@pytest.fixture(scope="module")
def helps():
    """{subcommand: --help text at COLUMNS=80}, rendered in one fresh process (no rich state leaks)."""
    code = ("import sys\nfrom eclip.cli import app\n"
            f"for c in {COMMANDS!r}:\n"
            "    print('=== ' + c, flush=True)\n"
            "    try: app((c.split() if c else []) + ['--help'], prog_name='eclip')\n"
            "    except SystemExit: pass\n"
            "    sys.stdout.flush()\n")
    env = {**os.environ, "COLUMNS": "80", "TERM": "dumb"}
    env.pop("FORCE_COLOR", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    parts = re.split(r"^=== ?(\S*)\n", out.stdout, flags=re.M)[1:]
    return dict(zip(parts[0::2], parts[1::2]))


def _options():
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        for param in command.params:
            if isinstance(param, click.Option):
                yield name, param


@pytest.mark.parametrize("command", COMMANDS)
def test_help_fits_80_columns_without_cutting_text(helps, command):
    text = helps[command]
    assert "Usage: eclip" in text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text, text      # rich's mark of a cell cut short
    assert "[default: None]" not in text


def test_no_shown_default_beside_required_or_a_default_in_the_text():
    for command, param in _options():
        where = f"{command} {param.opts[0]}"
        help_text = param.help or ""
        if param.required:
            assert not param.show_default, where
        if param.default is None and param.show_default is True:
            raise AssertionError(f"{where}: shows [default: None]")
        if "Default:" in help_text or "default:" in help_text:
            assert param.show_default in (False, None), f"{where}: a default in the text and another shown"


def test_examples_keep_their_lines(helps):
    """Lines of a \\b block (examples) are printed as written, not wrapped mid-line."""
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        for block in (command.help or "").split("\n\n"):
            if block.startswith("\b"):
                for line in block.strip("\b\n").splitlines():
                    assert line.rstrip() in helps[name], f"{name}: example line wrapped: {line!r}"


def test_json_help_says_what_the_command_prints(helps):
    assert "instead of a table" not in re.sub(r"\s+", " ", helps["embed"])


def test_lr_help_says_which_optimiser():
    lr = next(p for c, p in _options() if c == "train" and p.name == "lr")
    assert "AdamW" in lr.help and "Adam" in lr.help.replace("AdamW", "") and "weight-decay" in lr.help
