"""The command line shell: subcommands listed, version, and a --help that never imports torch
(nor the web server stack)."""
import subprocess
import sys

from typer.testing import CliRunner

from eclip import __version__
from eclip.cli import app


def test_help_lists_the_subcommands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("explain", "train", "embed", "match", "evaluate", "serve"):
        assert command in result.output


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_help_does_not_import_torch_or_open_clip():
    code = ("import sys; from eclip.cli import app\n"
            "for c in ['--help', 'train --help', 'match --help', 'embed --help', 'evaluate --help', 'explain --help', 'serve --help']:\n"
            "    try: app(c.split())\n"
            "    except SystemExit: pass\n"
            "heavy = [m for m in ('torch', 'open_clip', 'numpy', 'transformers', 'starlette', 'uvicorn', 'multipart') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
