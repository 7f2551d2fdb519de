"""The eclip command line in this process: `cli(*args)` -> click's Result, `ok(*args)` asserts exit 0."""
from typer.testing import CliRunner

from eclip.cli import app


def cli(*args):
    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:     # click >= 8.2 keeps stderr apart anyway
        runner = CliRunner()
    return runner.invoke(app, [str(a) for a in args])


def ok(*args):
    result = cli(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result
